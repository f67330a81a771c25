"""A captioner for whatever a user points at: a checkpoint file (`Captioner`, torch) or an exported folder
(`OnnxCaptioner`, ONNX Runtime); both implement `captioner.predictions.CaptionerProtocol`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from captioner.core.errors import CaptionerError
from captioner.predictions import CaptionerProtocol


def load_captioner(path: str | Path, device: str | None = None, **overrides: Any) -> CaptionerProtocol:
    """A captioner for a checkpoint file (torch, on `device`: None or "auto" for a GPU when there is one) or an
    exported folder (ONNX Runtime); `overrides`: decoding settings replacing the model's own.

    Raises:
        CaptionerError: When the path is neither, or the settings cannot run on the model.
    """
    path = Path(path)
    if path.is_dir():
        from captioner.runtime import OnnxCaptioner

        return OnnxCaptioner(path, **overrides)
    if not path.is_file():
        raise CaptionerError(f"{path} is neither a checkpoint file nor an exported folder.")
    from captioner.inference import Captioner

    return Captioner.from_checkpoint(path, None if device in (None, "auto") else device, **overrides)
