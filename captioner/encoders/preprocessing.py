"""The one definition of how an image becomes the encoder's input, whichever library decodes its bytes.

Each encoder owns one `Preprocessing` (resolved from its library: torchvision's
weights, timm's `pretrained_cfg`, OpenCLIP's `preprocess_cfg`, a Hugging Face
image processor). Feature extraction (on the CPU with PIL, on a GPU with
nvJPEG), `predict`, `caption`, `Captioner`, the server and the exported runtime
all follow it:

1. decode the image, first frame of an animation, only the formats of
   `captioner.core.pixels.ACCEPTED_FORMATS`; on the CPU a large JPEG decodes at a
   half, a quarter or an eighth of its size (libjpeg's DCT scaling) when that still
   leaves every side the resize below needs, several times faster for photographs
   far larger than the encoder's input; nvJPEG on a GPU decodes at full size, and
   the two agree within the tolerance the GPU tests hold them to;
2. convert to RGB, transparent pixels composited on white;
3. resize with antialiased bilinear or bicubic interpolation, rounded to uint8,
   either squashing the whole frame to `image_size` x `image_size` ("squash":
   captions describe the whole frame, nothing is cropped) or bringing the
   shorter side to `resize_size` and cropping the centre `image_size` square
   ("shorter": what CLIP, timm and most ViTs were trained with). The resize is
   torch's (`torchvision.transforms.v2.functional.resize`) on every torch path,
   on whatever device holds the pixels, and the same weights in numpy in the
   torch-free runtime (`captioner.core.pixels.preprocess_array`, within one grey
   level of torch's);
4. scale to [0, 1] and normalise with `mean` and `std` (inside the encoder, on
   its device).

The definition is stored in every checkpoint and export and is part of the
feature cache's key, so features computed one way are never mixed with another.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from captioner.core.errors import CaptionerError
from captioner.core.pixels import DECODE_ERRORS, FILTERS, check_pixels, open_accepted, reduce_while_decoding, to_rgb

__all__ = ["CLIP_MEAN", "CLIP_STD", "DECODE_ERRORS", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing", "to_rgb"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSING_VERSION = 2
RESIZE_MODES = ("squash", "shorter")
MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    """How pixels reach the encoder (see the module docstring for the steps).

    Attributes:
        image_size: Side of the square input.
        resize: "squash" (the whole frame to a square, aspect ratio not kept) or "shorter" (the shorter side to
            `resize_size`, then the centre `image_size` square).
        interpolation: "bilinear" or "bicubic" (both antialiased when shrinking).
        antialias: Low-pass filter when shrinking (torch's antialiased resize).
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided by.
        resize_size: The shorter side before the crop ("shorter"; None: `image_size`, a crop of the long side only).
    """

    image_size: int
    resize: str = "squash"
    interpolation: str = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES or self.interpolation not in FILTERS:
            raise CaptionerError(
                f"Unsupported preprocessing (resize={self.resize!r}, interpolation={self.interpolation!r}): "
                f"resize is one of {', '.join(RESIZE_MODES)}, interpolation one of {', '.join(FILTERS)}."
            )
        if self.image_size < 16 or (self.resize_size is not None and self.resize_size < self.image_size):
            raise CaptionerError(
                f"Unsupported preprocessing sizes (image_size={self.image_size}, resize_size={self.resize_size}): "
                "image_size must be at least 16 and resize_size at least image_size."
            )

    @classmethod
    def with_crop_fraction(cls, image_size: int, crop_fraction: float, **options: Any) -> Preprocessing:
        """The "shorter" definition of timm's and torchvision's evaluation transforms: the shorter side to
        `floor(image_size / crop_fraction)`, then the centre crop (crop_fraction 0.875: 256 then 224)."""
        return cls(
            image_size, resize="shorter", resize_size=max(image_size, math.floor(image_size / crop_fraction)), **options
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, stored in checkpoints, cache keys and exported folders."""
        return {"version": PREPROCESSING_VERSION, **asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, payload: dict[str, Any], source: str = "preprocessing") -> Preprocessing:
        """Rebuild from `to_dict` output (this version or version 1, which knew only "squash"), checking it.

        Raises:
            CaptionerError: When the version or a field is not understood.
        """
        if not isinstance(payload, dict) or payload.get("version") not in (1, PREPROCESSING_VERSION):
            raise CaptionerError(f"The preprocessing in {source} is missing or of another version: {payload!r}.")
        try:
            resize_size = payload.get("resize_size")
            return cls(
                int(payload["image_size"]),
                str(payload["resize"]),
                str(payload["interpolation"]),
                bool(payload["antialias"]),
                tuple(map(float, payload["mean"])),
                tuple(map(float, payload["std"])),
                None if resize_size is None else int(resize_size),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CaptionerError(f"The preprocessing in {source} is malformed ({error!r}).") from error

    def describe(self) -> str:
        """One line for tables and logs, e.g. "224 px, shorter side 256 + centre crop, bicubic, CLIP mean/std"."""
        geometry = (
            f"shorter side {self.resize_size or self.image_size} + centre crop"
            if self.resize == "shorter"
            else "squashed"
        )
        stats = {IMAGENET_MEAN: "ImageNet", CLIP_MEAN: "CLIP", (0.5, 0.5, 0.5): "0.5"}.get(self.mean, "own")
        return f"{self.image_size} px, {geometry}, {self.interpolation}, {stats} mean/std"

    # ------------------------------------------------------------ pixels
    def resize_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Resize (and crop) a uint8 `(3, H, W)` or `(B, 3, H, W)` tensor, on whatever device it is, to the input."""
        mode = MODES[self.interpolation]
        if self.resize == "squash":
            return TF.resize(images, [self.image_size, self.image_size], mode, antialias=self.antialias)
        resized = TF.resize(images, [self.resize_size or self.image_size], mode, antialias=self.antialias)
        return TF.center_crop(resized, [self.image_size, self.image_size])

    def from_pil(self, image: Image.Image) -> torch.Tensor:
        """A decoded PIL image (any mode) as a `(3, S, S)` uint8 tensor."""
        return self.resize_tensor(TF.pil_to_tensor(to_rgb(image)))

    def from_file(
        self, source: str | Path | io.BytesIO | bytes, max_pixels: int | None = None, reduced: bool = True
    ) -> torch.Tensor:
        """Decode an image file (or its bytes) into a `(3, S, S)` uint8 tensor.

        Args:
            source: A path, an open binary stream, or the bytes.
            max_pixels: Refuse images whose header declares more pixels than this (None: PIL's bomb limit only).
            reduced: A large JPEG decodes at the smallest DCT scale that still serves this definition
                (`captioner.core.pixels.reduce_while_decoding`); False: at full size.

        Raises:
            One of `DECODE_ERRORS` (the format is not accepted, or the file cannot be decoded).
        """
        with open_accepted(source) as image:
            check_pixels(image, max_pixels)
            image.seek(0)  # the first frame of an animation
            reduce_while_decoding(image, self.to_dict() if reduced else None)
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

    # ------------------------------------------------------------ training
    def augmented(self, image: torch.Tensor, generator: torch.Generator, min_side: float = 0.9) -> torch.Tensor:
        """The training transform for a fine-tuned encoder: a random crop keeping `min_side`..100 % of each side of
        the full-size `(3, H, W)` uint8 image, then this definition (`min_side` 1: the definition alone).

        No flips and no colour jitter: captions name left and right and colours, which those would falsify.
        """
        height, width = image.shape[-2:]
        fractions = min_side + (1 - min_side) * torch.rand(2, generator=generator)
        crop_h, crop_w = max(1, round(height * float(fractions[0]))), max(1, round(width * float(fractions[1])))
        top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
        return self.resize_tensor(image[..., top : top + crop_h, left : left + crop_w])

    def augmented_file(self, source: str | Path, generator: torch.Generator, min_side: float = 0.9) -> torch.Tensor:
        """`augmented` on a decoded image file.

        Raises:
            One of `DECODE_ERRORS`.
        """
        with open_accepted(source) as image:
            image.seek(0)
            image.load()
            return self.augmented(TF.pil_to_tensor(to_rgb(image)), generator, min_side)
