"""Captioning images with a trained model: the Python API, what it returns, and the engine behind every entry point.

    from captioner.inference import Captioner, OnnxCaptioner, load_captioner
    Captioner.from_checkpoint("best.ckpt").caption("photo.jpg")        # PyTorch, a checkpoint
    OnnxCaptioner("exported/").predict(["a.jpg", "b.png"])              # ONNX Runtime, no torch
    load_captioner("best.ckpt" or "exported/" or "user/name")         # whichever it is

- `protocol.py`: `CaptionerProtocol`, what every captioner offers, and `ImageCaptioner`, the part written once;
- `engine.py`: the captioning engine (images in any form, decoded in threads, batches prefetched, rows out);
- `checkpoint.py`: `Captioner` (torch); `exported.py`: `OnnxCaptioner`, the exported runtime (torch-free);
- `loading.py`: `load_captioner`, a captioner for a checkpoint, an exported or published folder, or a hub id.

Rows are `captioner.decoding.answers.Prediction` (`ROW_FIELDS`). Importing this package loads no torch: `Captioner`
imports it when first named.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "Captioner": "captioner.inference.checkpoint",
    "OnnxCaptioner": "captioner.inference.exported",
    "load_captioner": "captioner.inference.loading",
    "CaptionerProtocol": "captioner.inference.protocol",
    "ImageCaptioner": "captioner.inference.protocol",
    "CaptioningEngine": "captioner.inference.engine",
    "ImageInput": "captioner.inference.engine",
    "Prediction": "captioner.decoding.answers",
    "ROW_FIELDS": "captioner.decoding.answers",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'captioner.inference' has no attribute {name!r}")
