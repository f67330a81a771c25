"""Image encoders as parts (see `captioner.encoders.base` for the protocol), their input definition and image
decoding; the features they compute are kept by `captioner.features`.

Built in, one file per library: `TorchvisionEncoder` (torchvision), `TimmEncoder` (timm), `OpenClipEncoder`
(OpenCLIP) and `HuggingFaceEncoder` (transformers). The libraries beyond torchvision are optional extras.
"""

from captioner.encoders.base import ImageEncoder, encoder_from_spec
from captioner.encoders.hugging_face import HuggingFaceEncoder
from captioner.encoders.open_clip_models import OpenClipEncoder
from captioner.encoders.preprocessing import Preprocessing
from captioner.encoders.timm_models import TimmEncoder
from captioner.encoders.torchvision_models import TorchvisionEncoder

__all__ = [
    "HuggingFaceEncoder",
    "ImageEncoder",
    "OpenClipEncoder",
    "Preprocessing",
    "TimmEncoder",
    "TorchvisionEncoder",
    "encoder_from_spec",
]
