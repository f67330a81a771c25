"""captioner: image captioning experiments on PyTorch Lightning.

`Captioner` (torch) is imported on first use, so `captioner.inference.OnnxCaptioner`
(ONNX Runtime, numpy and pillow only) imports on machines without torch.

Layers, each importing only those below it: `core` (errors, files, parts,
pixels, hardware, hub: nothing of ours), `compat` (files and names of older
versions), `text`, `decoding`, `encoders`, `features`, `data`, `models`,
`evaluation`, then the applications (`inference`, `runtime`, `export`, `serve`,
`bulk`, `cli`).
"""

from captioner.compat.names import install_moved_modules
from captioner.core.errors import CaptionerError
from captioner.core.version import __version__
from captioner.decoding.answers import Prediction

__all__ = ["Captioner", "CaptionerError", "OnnxCaptioner", "Prediction", "__version__", "load_captioner"]

install_moved_modules()  # captioner 0.3's module names (captioner.errors, ...) keep working


def __getattr__(name: str):
    if name in ("Captioner", "OnnxCaptioner", "load_captioner"):
        import captioner.inference

        return getattr(captioner.inference, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
