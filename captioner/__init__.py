"""captioner: image captioning experiments on PyTorch Lightning."""

from captioner.errors import CaptionerError
from captioner.inference import Captioner, Prediction

__version__ = "0.1.0"
__all__ = ["Captioner", "CaptionerError", "Prediction", "__version__"]
