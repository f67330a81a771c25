"""CaptionAPI: the LitServe API that captions uploaded images in dynamic batches.

One request: one image, as a multipart upload (field `image`) or base64 in
JSON (`{"image": "..."}`), with optional decoding settings for itself
(`num_beams`, `num_return` for ranked alternatives, `length_penalty`,
`max_length`, `min_length`, `no_repeat_ngram_size`, `do_sample`, `temperature`,
`top_k`, `top_p`, `seed`; see `captioner.decoding.DecodingConfig`; the 0.2 field
`beams` is `num_return`) and `attention` (per-word attention weights, for
decoders that attend). Requests that arrive within `batch_timeout` of each other, up to
`max_batch_size`, are captioned in one batch. Every bad request gets a 4xx JSON
answer saying what was wrong; the server keeps serving.

Memory: an image is brought to the encoder's input size as soon as it is
decoded (the encoder's one preprocessing definition), so a request waiting for
its batch holds kilobytes of pixels, not its full-size bitmap; at most
`max_decodes` full-size decodes run at once in a worker, and the worker's
allocator hands large blocks back to the system when they are freed.
"""

# No `from __future__ import annotations` here: LitServe reads `decode_request`'s annotation as a class to decide
# to parse forms and JSON for it.
import base64
import binascii
import ctypes
import ctypes.util
import threading
import time
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import HTTPException, Request

from captioner.decoding.config import DecodingConfig
from captioner.errors import CaptionerError
from captioner.pixels import ACCEPTED_NAMES, DECODE_ERRORS, TooManyPixelsError, UnsupportedFormatError

MAX_BEAMS = 10
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_large_blocks_to_the_system(threshold: int = 1 << 20) -> bool:
    """Have glibc serve every allocation over `threshold` with its own mapping, returned to the system when freed.

    By default glibc raises this threshold (up to 32 MB) after large blocks are freed, and later blocks of a
    decoded picture then come from its heap, which it keeps: a server that decoded a few large uploads would hold
    their memory for good. Returns False where the C library is not glibc (nothing is changed).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    if str(value).strip().lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise HTTPException(400, f"'{name}' must be true or false, got {value!r}.")


# What a request may set for itself, with the type and range each takes.
REQUEST_SETTINGS: dict[str, tuple[type, float, float]] = {
    "num_beams": (int, 1, MAX_BEAMS), "num_return": (int, 0, MAX_BEAMS), "length_penalty": (float, -5, 5),
    "max_length": (int, 1, 100), "min_length": (int, 0, 100), "no_repeat_ngram_size": (int, 0, 10),
    "do_sample": (bool, 0, 1), "temperature": (float, 0.01, 100), "top_k": (int, 0, 10**6), "top_p": (float, 0, 1),
    "seed": (int, 0, 2**63 - 1),
}  # fmt: skip


def _number(value: Any, name: str, kind: type, low: float, high: float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise HTTPException(
            400, f"'{name}' must be a {'whole ' if kind is int else ''}number, got {value!r}."
        ) from None
    if not low <= number <= high:
        raise HTTPException(400, f"'{name}' must be between {low:g} and {high:g}, got {number}.")
    return number


def request_decoding(request: Any, base: DecodingConfig) -> DecodingConfig:
    """The decoding settings a request asks for, on top of the server's.

    Raises:
        HTTPException: 400 naming the field that is not understood or out of range.
    """
    fields = {name: request.get(name) for name in (*REQUEST_SETTINGS, "beams")}
    if fields["num_return"] in (None, "") and fields["beams"] not in (None, ""):
        fields["num_return"] = fields["beams"]  # the 0.2 name
    overrides = {}
    for name, (kind, low, high) in REQUEST_SETTINGS.items():
        value = fields[name]
        if value is None or value == "":
            continue
        overrides[name] = _flag(value, name) if kind is bool else _number(value, name, kind, low, high)
    if overrides.get("num_return") == 0:  # 0.2 clients asked for no alternatives with beams=0
        overrides["num_return"] = 1
    if "num_return" in overrides and "num_beams" not in overrides:
        overrides["num_beams"] = max(base.num_beams, overrides["num_return"])
    try:
        return base.with_overrides(**overrides)
    except CaptionerError as error:
        raise HTTPException(400, str(error)) from None


def image_bytes(request: Any) -> bytes:
    """The image's bytes from a multipart form (field `image`) or a JSON object (`image`, base64).

    Raises:
        HTTPException: 400 when the field is missing, empty or not base64.
    """
    field = request.get("image") if hasattr(request, "get") else None
    if field is None:
        raise HTTPException(400, 'No image: send a multipart field \'image\' (a file) or JSON {"image": "<base64>"}.')
    if hasattr(field, "file"):  # an uploaded file, kept in memory by RequestGuard
        data = field.file.read()
    elif isinstance(field, str):
        text = field.split(",", 1)[1] if field.startswith("data:") else field  # a data URL is fine too
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, "'image' is not valid base64.") from None
    else:
        raise HTTPException(400, "'image' must be a file upload or a base64 string.")
    if not data:
        raise HTTPException(400, "The image is empty (0 bytes).")
    return data


class CaptionAPI(ls.LitAPI):
    """Caption images with a checkpoint or an exported folder (see `captioner.serve.load_model`).

    Args:
        model_path: A checkpoint (`.ckpt`) or a folder written by `python -m captioner export`.
        decoding: Decoding settings replacing the model's own (a request may change them for itself).
        max_pixels: Refuse images whose header declares more pixels (decompression bombs).
        max_batch_size: Most requests captioned together.
        batch_timeout: Seconds to wait for more requests to fill a batch.
        max_decodes: Full-size decodes at once in a worker (each up to `max_pixels` x 12 bytes with its copies).
    """

    def __init__(
        self, model_path: str | Path, decoding: dict | None = None, max_pixels: int = 40_000_000,
        max_batch_size: int = 16, batch_timeout: float = 0.01, max_decodes: int = 2,
    ) -> None:  # fmt: skip
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.model_path, self.overrides, self.max_pixels = str(model_path), dict(decoding or {}), max_pixels
        self.max_decodes = max(1, max_decodes)

    def setup(self, device: str) -> None:
        from captioner.serve import load_model

        return_large_blocks_to_the_system()
        self.decoding = threading.BoundedSemaphore(self.max_decodes)
        self.captioner = load_model(self.model_path, device, **self.overrides)

    def decode_request(self, request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        data = image_bytes(request)
        try:
            with self.decoding:  # the full-size picture exists only inside this block
                pixels = self.captioner.pixels_from_bytes(data, self.max_pixels)
        except TooManyPixelsError as error:
            raise HTTPException(413, f"The image is too large to decode safely: {error} (--max_pixels).") from None
        except UnsupportedFormatError:
            raise HTTPException(415, f"Not an image, or not a format this server accepts ({ACCEPTED_NAMES})."
                                ) from None  # fmt: skip
        except DECODE_ERRORS as error:
            raise HTTPException(422, f"The image cannot be decoded: truncated or corrupt ({error}).") from None
        return {"image": pixels, "decoding": request_decoding(request, self.captioner.decoding),
                "attention": _flag(request.get("attention"), "attention"), "started": started,
                "decode_ms": 1000 * (time.perf_counter() - started)}  # fmt: skip

    def batch(self, inputs: list[dict]) -> list[dict]:
        return inputs

    def predict(self, inputs: list[dict]) -> list[dict]:
        """Caption a batch: requests that ask for the same decoding settings are searched together."""
        started = time.perf_counter()
        rows: list[dict | None] = [None] * len(inputs)
        groups: dict[DecodingConfig, list[int]] = {}
        for index, item in enumerate(inputs):
            groups.setdefault(item["decoding"], []).append(index)
        for config, members in groups.items():
            described = self.captioner.describe([inputs[i]["image"] for i in members],
                                                attention=any(inputs[i]["attention"] for i in members),
                                                **config.to_dict())  # fmt: skip
            for index, row in zip(members, described):
                rows[index] = row
        model_ms = 1000 * (time.perf_counter() - started)
        return [{**row, "request": item, "model_ms": model_ms, "batch_size": len(inputs)}
                for row, item in zip(rows, inputs)]  # fmt: skip

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output

    def encode_response(self, output: dict) -> dict[str, Any]:
        request = output["request"]
        response = {"caption": output["caption"], "score": round(output["score"], 5)}
        if "alternatives" in output:
            response["alternatives"] = [{"caption": a["caption"], "score": round(a["score"], 5)}
                                        for a in output["alternatives"]]  # fmt: skip
        if request["attention"]:
            response["attention"] = output["attention"]
        response["time_ms"] = {"decode": round(request["decode_ms"], 2), "model": round(output["model_ms"], 2),
                               "total": round(1000 * (time.perf_counter() - request["started"]), 2),
                               "batch_size": output["batch_size"]}  # fmt: skip
        return response
