"""captioner: image captioning experiments on PyTorch Lightning.

`Captioner` (torch) is imported on first use, so `captioner.runtime` (ONNX
Runtime, numpy and pillow only) imports on machines without torch.
"""

from captioner.errors import CaptionerError
from captioner.predictions import Prediction

__version__ = "0.3.0"
__all__ = ["Captioner", "CaptionerError", "Prediction", "__version__"]


def __getattr__(name: str):
    if name == "Captioner":
        from captioner.inference import Captioner

        return Captioner
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
