"""CaptionAPI: the LitServe API that captions uploaded images in dynamic batches.

One request: one image, as a multipart upload (field `image`) or base64 in
JSON (`{"image": "..."}`), with optional decoding settings for itself: every
field of `captioner.decoding.DecodingConfig` (`num_beams`, `num_return` for
ranked alternatives, `length_penalty`, `max_length`, `min_length`,
`no_repeat_ngram_size`, `bad_endings` (a JSON list, or words separated by
commas), `early_stopping` (true, false or never), `num_beam_groups`,
`diversity_penalty`, `do_sample`, `temperature`, `top_k`, `top_p`, `seed`; the
0.2 field `beams` is `num_return`), checked against the model before it runs
(`max_length` within the decoder's positions, `top_k` within its vocabulary),
and `attention` (per-word attention weights, for decoders that attend; null
otherwise). Requests that arrive within `batch_timeout` of each other, up to
`max_batch_size`, are captioned in one batch, but each is decoded, checked and
answered on its own (`captioner.serve.batching`): a bad request gets its own
4xx JSON answer saying what was wrong, its neighbours their captions. The answer
is the row every output shares (`captioner.decoding.answers.ROW_FIELDS`: image,
caption, score, confidence, alternatives, constraints_met, clip_score, error),
with `time_ms` and, on request, `attention`.

The same requests in the OpenAI chat API's shape (`POST /v1/chat/completions`, the image as an `image_url` part)
take the same path, read and answered by `captioner.serve.openai`.

Memory: an image is brought to the encoder's input size as soon as it is
decoded (the encoder's one preprocessing definition), so a request waiting for
its batch holds kilobytes of pixels, not its full-size bitmap; at most
`max_decodes` full-size decodes run at once in a worker, and the worker's
allocator hands large blocks back to the system when they are freed.
"""

# No `from __future__ import annotations` here: LitServe reads `decode_request`'s annotation as a class to decide
# to parse forms and JSON for it.
import asyncio
import base64
import binascii
import ctypes
import ctypes.util
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import HTTPException, Request

from captioner.compat.names import OLD_REQUEST_FIELDS, upgraded_request
from captioner.core.errors import CaptionerError
from captioner.core.pixels import ACCEPTED_NAMES, DECODE_ERRORS, TooManyPixelsError, UnsupportedFormatError
from captioner.decoding.answers import Prediction
from captioner.decoding.config import DecodingConfig, ModelLimits, request_ranges
from captioner.inference.protocol import attention_as_lists
from captioner.serve import openai
from captioner.serve.batching import RequestBatcher

log = logging.getLogger("captioner")

MAX_LISTED_WORDS = 50
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


def _early_stopping(value: Any, name: str) -> bool | str:
    if str(value).strip().lower() == "never":
        return "never"
    return _flag(value, name)


def _words(value: Any, name: str) -> tuple[str, ...]:
    """A list of words: a JSON list, or one form field of words separated by commas or spaces."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    if len(items) > MAX_LISTED_WORDS or not all(isinstance(item, str) and item.strip() for item in items):
        raise HTTPException(400, f"'{name}' must be at most {MAX_LISTED_WORDS} words, got {value!r}.")
    return tuple(item.strip() for item in items)


def _phrase(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise HTTPException(400, f"'{name}' must be words, got {value!r}.")
    return value.strip()


def _phrases(value: Any, name: str) -> tuple:
    """Phrases: a JSON list (an entry that is a list: any one of its phrases), or a form field of phrases separated
    by commas, `|` between alternatives."""
    items = value if isinstance(value, (list, tuple)) else [part for part in str(value).split(",") if part.strip()]
    if len(items) > MAX_LISTED_WORDS:
        raise HTTPException(400, f"'{name}' must be at most {MAX_LISTED_WORDS} phrases, got {len(items)}.")
    phrases = []
    for item in items:
        if isinstance(item, (list, tuple)) or (isinstance(item, str) and "|" in item):
            parts = item if isinstance(item, (list, tuple)) else item.split("|")
            phrases.append(tuple(_phrase(part, name) for part in parts))
        else:
            phrases.append(_phrase(item, name))
    return tuple(phrases)


# How a request's field of each kind of setting (`captioner.decoding.config.Setting.kind`) is read.
PARSERS = {"bool": _flag, "words": _words, "phrase": _phrase, "phrases": _phrases, "stopping": _early_stopping}
LIST_KINDS = ("words", "phrases")  # an empty value is a setting (none), not a missing field


def request_bounds(limits: ModelLimits) -> dict[str, tuple[Any, ...]]:
    """What a request may set for itself, from the settings' declarations (`captioner.decoding.config`): every
    `DecodingConfig` field with its parser and, for numbers, the range, the model's own limits included (its
    longest caption, its vocabulary)."""
    bounds = {}
    for name, (kind, low, high) in request_ranges(limits).items():
        bounds[name] = (
            (int, low, high) if kind == "int" else (float, low, high) if kind == "float" else (PARSERS[kind],)
        )
    return bounds


def request_decoding(request: Any, base: DecodingConfig, limits: ModelLimits) -> DecodingConfig:
    """The decoding settings a request asks for, on top of the server's, checked against the model.

    Raises:
        HTTPException: 400 naming the field that is not understood, out of range, or more than the model can do.
    """
    bounds = request_bounds(limits)
    kinds = {name: kind for name, (kind, _, _) in request_ranges(limits).items()}
    fields = {name: request.get(name) for name in (*bounds, *OLD_REQUEST_FIELDS)}
    fields = upgraded_request(fields)
    overrides = {}
    for name, (parse, *interval) in bounds.items():
        value = fields.get(name)
        if value is None or (value == "" and kinds[name] not in LIST_KINDS):
            continue
        overrides[name] = _number(value, name, parse, *interval) if interval else parse(value, name)
    if overrides.get("num_return") == 0:  # 0.2 clients asked for no alternatives with beams=0
        overrides["num_return"] = 1
    try:
        return base.with_overrides(**overrides).checked(limits)
    except CaptionerError as error:
        raise HTTPException(400, str(error)) from None


def image_bytes(request: Any) -> tuple[bytes, str]:
    """The image's bytes from a multipart form (field `image`) or a JSON object (`image`, base64), and the name its
    row gives it (the upload's file name, else `upload`).

    Raises:
        HTTPException: 400 when the field is missing, empty or not base64.
    """
    field = request.get("image") if hasattr(request, "get") else None
    if field is None:
        raise HTTPException(400, 'No image: send a multipart field \'image\' (a file) or JSON {"image": "<base64>"}.')
    name = "upload"
    if hasattr(field, "file"):  # an uploaded file, kept in memory by RequestGuard
        data, name = field.file.read(), getattr(field, "filename", None) or name
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
    return data, name


class CaptionAPI(ls.LitAPI):
    """Caption images with a checkpoint or an exported folder (see `captioner.inference.load_captioner`).

    LitServe hands each request to this API on its own (an async API, one request per call); `RequestBatcher`
    captions the requests that arrive together in one batch (`captioner.serve.batching`).

    Args:
        model_path: A checkpoint (`.ckpt`) or a folder written by `python -m captioner export`.
        decoding: Decoding settings replacing the model's own (a request may change them for itself).
        max_pixels: Refuse images whose header declares more pixels (decompression bombs).
        max_batch_size: Most requests captioned together.
        batch_timeout: Seconds to wait for more requests to fill a batch.
        max_decodes: Full-size decodes at once in a worker (each up to `max_pixels` x 12 bytes with its copies).
        rerank_clip: A CLIP model reordering the beam's alternatives by CLIPScore (None: the model's ranking).
        model_name: The model's name in the OpenAI API's answers (None: the checkpoint's or the folder's name).
        allow_url_fetch: Fetch an http(s) `image_url` of a chat request (else only `data:` URLs are read).
        max_fetch_bytes: The largest image fetched.
        fetch_timeout: Seconds a fetch may take.
    """

    def __init__(
        self,
        model_path: str | Path,
        decoding: dict | None = None,
        max_pixels: int = 40_000_000,
        max_batch_size: int = 16,
        batch_timeout: float = 0.01,
        max_decodes: int = 2,
        rerank_clip: str | None = None,
        model_name: str | None = None,
        allow_url_fetch: bool = False,
        max_fetch_bytes: int = 20 * 2**20,
        fetch_timeout: float = 30.0,
    ) -> None:
        super().__init__(max_batch_size=1, api_path="/predict", enable_async=True)
        self.model_path, self.overrides, self.max_pixels = str(model_path), dict(decoding or {}), max_pixels
        self.model_name = model_name or Path(model_path).stem
        self.allow_url_fetch, self.max_fetch_bytes, self.fetch_timeout = allow_url_fetch, max_fetch_bytes, fetch_timeout
        self.max_decodes, self.rerank_clip = max(1, max_decodes), rerank_clip
        self.batch_size, self.batch_timeout_s = max_batch_size, batch_timeout

    def setup(self, device: str) -> None:
        from captioner.inference.loading import load_captioner

        return_large_blocks_to_the_system()
        self.attach(load_captioner(self.model_path, device, self.rerank_clip, **self.overrides))

    def attach(self, captioner: Any) -> None:
        """Serve with `captioner` (`setup` loads it from `model_path`; a test hands one in)."""
        self.captioner = captioner
        self.pixels = captioner.pixel_decoder()
        # The full-size picture exists only inside a decode: at most `max_decodes` of them at once.
        self.decodes = ThreadPoolExecutor(self.max_decodes, thread_name_prefix="captioner-decode")
        self.batcher = RequestBatcher(self.caption_batch, self.batch_size, self.batch_timeout_s)

    async def decode_request(self, request: Request) -> dict[str, Any]:
        """One request's settings and image, checked before the model sees them.

        Raises:
            HTTPException: 4xx saying what is wrong with this request (it alone is answered so).
        """
        started = time.perf_counter()
        chat = openai.is_chat(request)
        if chat:
            longest = self.captioner.decoding.max_words(self.captioner.limits.default_max_words)
            url, fields = openai.chat_fields(request, longest, self.styles)
            decoding = request_decoding(fields, self.captioner.decoding, self.captioner.limits)  # cheap: first
            data, name, attention = await self.chat_image(url), "image_url", False
        else:
            decoding = request_decoding(request, self.captioner.decoding, self.captioner.limits)
            attention = _flag(request.get("attention"), "attention")
            data, name = image_bytes(request)
        pixels = await asyncio.get_running_loop().run_in_executor(self.decodes, self.decode_image, data)
        return {
            "image": name,
            "pixels": pixels,
            "decoding": decoding,
            "attention": attention,
            "chat": chat,
            "started": started,
            "decode_ms": 1000 * (time.perf_counter() - started),
        }

    @property
    def styles(self) -> tuple[str, ...]:
        """The caption styles the model was trained on (none for a model of one style)."""
        return tuple(getattr(self.captioner.limits, "styles", ()) or ())

    async def chat_image(self, url: str) -> bytes:
        """A chat request's image: a `data:` URL's bytes, or an http(s) URL's where this server fetches.

        Raises:
            HTTPException: 400 when it cannot be read or this server does not fetch URLs, 413/408 for a fetch over
                the size or the time.
        """
        data = openai.data_url_bytes(url)
        if data is None:
            if not self.allow_url_fetch:
                raise HTTPException(
                    400,
                    "This server does not fetch image URLs: send the image as a data: URL "
                    "(data:image/jpeg;base64,...), or start serve with --allow_url_fetch.",
                )
            data = await openai.fetched(url, self.max_fetch_bytes, self.fetch_timeout)
        if not data:
            raise HTTPException(400, "The image is empty (0 bytes).")
        return data

    def count_tokens(self, caption: str) -> int:
        """The tokens a caption is (between the start and the end token), for a chat answer's `usage`."""
        tokenizer = self.captioner.limits.tokenizer
        return max(0, len(tokenizer.encode(caption)) - 2) if tokenizer is not None else len(caption.split())

    def decode_image(self, data: bytes) -> Any:
        """The encoder's input from an upload's bytes.

        Raises:
            HTTPException: 413 over `max_pixels`, 415 for what is not an accepted image, 422 when it is corrupt.
        """
        try:
            return self.captioner.pixels_from_bytes(data, self.max_pixels)
        except TooManyPixelsError as error:
            raise HTTPException(413, f"The image is too large to decode safely: {error} (--max_pixels).") from None
        except UnsupportedFormatError:
            raise HTTPException(415, f"Not an image, or not a format this server accepts ({ACCEPTED_NAMES}).") from None
        except DECODE_ERRORS as error:
            raise HTTPException(422, f"The image cannot be decoded: truncated or corrupt ({error}).") from None

    async def predict(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.batcher.submit(request)

    def caption_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        """Caption decoded requests together: those asking for the same decoding settings are searched as one batch;
        a group that fails answers its own requests with the error, not its neighbours'."""
        started = time.perf_counter()
        results: list[dict[str, Any] | Exception | None] = [None] * len(requests)
        groups: dict[DecodingConfig, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request["decoding"], []).append(index)
        for config, members in groups.items():
            attention = any(requests[i]["attention"] for i in members)
            try:
                pixels = self.pixels.stack([requests[i]["pixels"] for i in members])
                answers = [attention_as_lists(row) for row in self.captioner.describe_pixels(pixels, config, attention)]
                found: list[Any] = [
                    Prediction.answered(requests[i]["image"], answer) for i, answer in zip(members, answers)
                ]
            except CaptionerError as error:
                found = [HTTPException(400, str(error))] * len(members)
            except Exception as error:  # a fault of the model with these settings: logged, 500 for these requests
                log.error(
                    "Captioning %d requests failed: %s: %s", len(members), type(error).__name__, error, exc_info=error
                )
                found = [error] * len(members)
            for index, result in zip(members, found):
                results[index] = result
        model_ms = 1000 * (time.perf_counter() - started)
        return [
            result
            if isinstance(result, Exception)
            else {"prediction": result, "request": request, "model_ms": model_ms, "batch_size": len(requests)}
            for result, request in zip(results, requests)
        ]

    async def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        """The row (`captioner.decoding.answers.ROW_FIELDS`, scores rounded), the attention when asked for, and where
        the time went."""
        request, prediction = output["request"], output["prediction"]
        if request["chat"]:
            return openai.completion(prediction, self.model_name, self.count_tokens)
        response = prediction.row()
        response["score"] = round(prediction.score, 5)
        if prediction.alternatives is not None:
            response["alternatives"] = [
                {**entry, "score": round(entry["score"], 5)} for entry in response["alternatives"]
            ]
        if request["attention"]:
            response["attention"] = prediction.attention
        response["time_ms"] = {
            "decode": round(request["decode_ms"], 2),
            "model": round(output["model_ms"], 2),
            "total": round(1000 * (time.perf_counter() - request["started"]), 2),
            "batch_size": output["batch_size"],
        }
        return response
