"""The one definition of how an image becomes the encoder's input, whichever library decodes its bytes.

Feature extraction (on the CPU with PIL, on a GPU with nvJPEG), `predict`,
`caption`, `Captioner`, the server and the exported runtime all follow it:

1. decode the whole image at full resolution (no JPEG DCT downscaling, which
   nvJPEG cannot do and which changes the pixels by up to tens of grey levels),
   first frame of an animation;
2. convert to RGB, transparent pixels composited on white;
3. squash to `image_size` x `image_size` (captions describe the whole frame, so
   no crop) with antialiased bilinear interpolation, rounded to uint8; the
   resize is torch's (`torchvision.transforms.v2.functional.resize`) on every
   torch path, on whatever device holds the pixels, and the same weights in
   numpy in the torch-free runtime (`captioner.pixels.resize_array`, within one
   grey level of torch's);
4. scale to [0, 1] and normalise with `mean` and `std` (inside the encoder, on
   its device).

The definition is stored in every checkpoint and is part of the feature
cache's key, so features computed one way are never mixed with another.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from captioner.errors import CaptionerError
from captioner.pixels import DECODE_ERRORS, to_rgb

__all__ = ["DECODE_ERRORS", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing", "to_rgb"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING_VERSION = 1


@dataclass(frozen=True)
class Preprocessing:
    """How pixels reach the encoder (see the module docstring for the steps).

    Attributes:
        image_size: Side of the square input.
        resize: "squash": the whole frame scaled to a square, aspect ratio not kept, nothing cropped.
        interpolation: "bilinear".
        antialias: Low-pass filter when shrinking (torch's antialiased resize).
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided by.
    """

    image_size: int
    resize: str = "squash"
    interpolation: str = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.resize != "squash" or self.interpolation != "bilinear":
            raise CaptionerError(
                f"Unsupported preprocessing (resize={self.resize!r}, interpolation={self.interpolation!r}): "
                "this version of captioner knows resize='squash' with bilinear interpolation."
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, stored in checkpoints, cache keys and exported folders."""
        return {"version": PREPROCESSING_VERSION, **asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, payload: dict[str, Any], source: str = "preprocessing") -> Preprocessing:
        """Rebuild from `to_dict` output, checking it.

        Raises:
            CaptionerError: When the version or a field is not understood.
        """
        if not isinstance(payload, dict) or payload.get("version") != PREPROCESSING_VERSION:
            raise CaptionerError(f"The preprocessing in {source} is missing or of another version: {payload!r}.")
        try:
            return cls(int(payload["image_size"]), str(payload["resize"]), str(payload["interpolation"]),
                       bool(payload["antialias"]), tuple(map(float, payload["mean"])),
                       tuple(map(float, payload["std"])))  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise CaptionerError(f"The preprocessing in {source} is malformed ({error!r}).") from error

    # ------------------------------------------------------------ pixels
    def resize_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Resize a uint8 `(3, H, W)` or `(B, 3, H, W)` tensor, on whatever device it is, to the input size."""
        return TF.resize(
            images, [self.image_size, self.image_size], InterpolationMode.BILINEAR, antialias=self.antialias
        )

    def from_pil(self, image: Image.Image) -> torch.Tensor:
        """A decoded PIL image (any mode) as a `(3, S, S)` uint8 tensor."""
        return self.resize_tensor(TF.pil_to_tensor(to_rgb(image)))

    def from_file(self, source: str | Path | io.BytesIO) -> torch.Tensor:
        """Decode an image file (or its bytes) at full resolution into a `(3, S, S)` uint8 tensor.

        Raises:
            OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError: When it cannot be decoded
            (all listed in `DECODE_ERRORS`).
        """
        with Image.open(source) as image:
            image.seek(0)  # the first frame of an animation
            image.load()
            return self.from_pil(image)

    def from_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """An image tensor `(3, H, W)` or `(1, H, W)`, uint8 in [0, 255] or float in [0, 1], as `(3, S, S)` uint8.

        Raises:
            ValueError: When the tensor has another shape.
        """
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be (3, H, W) or (1, H, W), got {tuple(image.shape)}")
        image = image.detach().cpu()  # captioning batches are assembled on the CPU, whatever device this came from
        if image.dtype != torch.uint8:
            image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return self.resize_tensor(image.expand(3, -1, -1))
