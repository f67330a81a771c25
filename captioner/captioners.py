"""A captioner for whatever a user points at: a checkpoint file (`Captioner`, torch) or an exported folder
(`OnnxCaptioner`, ONNX Runtime); both implement `captioner.predictions.CaptionerProtocol`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from captioner.core.errors import CaptionerError
from captioner.core.pixels import DECODE_ERRORS, describe_error
from captioner.predictions import CaptionerProtocol


def load_captioner(path: str | Path, device: str | None = None, rerank_clip: str | None = None,
                   **overrides: Any) -> CaptionerProtocol:  # fmt: skip
    """A captioner for a checkpoint file (torch, on `device`: None or "auto" for a GPU when there is one) or an
    exported folder (ONNX Runtime); `rerank_clip`: a CLIP model reordering the beam's alternatives by CLIPScore
    (torch only); `overrides`: decoding settings replacing the model's own.

    Raises:
        CaptionerError: When the path is neither, the settings cannot run on the model, or reranking is asked of an
            exported folder.
    """
    from captioner.published import is_published

    path, device = Path(path), None if device in (None, "auto") else device
    if path.is_dir() and is_published(path) or not path.exists() and _looks_like_hub_id(str(path)):
        from captioner.inference import Captioner

        return Captioner.from_pretrained(path if path.is_dir() else str(path), device, rerank_clip=rerank_clip,
                                         **overrides)  # fmt: skip
    if path.is_dir():
        from captioner.runtime import OnnxCaptioner

        if rerank_clip is not None:
            raise CaptionerError(f"{path} is an exported folder, run without torch: reranking by CLIPScore runs CLIP "
                                 "in PyTorch. Caption with the checkpoint (or a published folder) to rerank, or "
                                 "leave out --rerank_clip.")  # fmt: skip
        return OnnxCaptioner(path, **overrides)
    if not path.is_file():
        raise CaptionerError(f"{path} is neither a checkpoint file, an exported or published folder, nor a hub id "
                             "(user/name).")  # fmt: skip
    from captioner.inference import Captioner

    return Captioner.from_checkpoint(path, device, rerank_clip=rerank_clip, **overrides)


def _looks_like_hub_id(name: str) -> bool:
    """`user/name`: two parts, no path beyond them (a missing local file has more or starts with . or /)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def describe_files(captioner: CaptionerProtocol, paths: Sequence[str | Path],
                   **settings: Any) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Every file's answer in order, `captioner.batch_size` files at a time: `path`, `caption`, `score`,
    `alternatives` (with `num_return` > 1), `constraints_met` (with forced words) and `error` (a file that cannot be
    read gets its reason; the rest go on)."""
    for start in range(0, len(paths), captioner.batch_size):
        batch, pixels, rows = paths[start : start + captioner.batch_size], [], []
        for path in batch:
            try:
                pixels.append(captioner.pixels_from_bytes(Path(path).read_bytes()))
                rows.append({"path": str(path), "error": None})
            except (OSError, *DECODE_ERRORS) as error:
                rows.append({"path": str(path), "caption": None, "score": None, "error": describe_error(error)})
        described = iter(captioner.describe(pixels, **settings) if pixels else [])
        for row in rows:
            if row["error"] is None:
                answer = next(described)
                answer.pop("attention", None)
                row.update(answer)
            yield row
