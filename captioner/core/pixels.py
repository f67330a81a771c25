"""Pixels without torch: opening image bytes safely, RGB conversion, and the resize and crop, in numpy.

Shared by every captioning path: the torch paths (`captioner.encoders.preprocessing`)
and the torch-free ONNX runtime (`captioner.inference.exported`), which must import without
torch.

Only the formats in `ACCEPTED_FORMATS` are ever opened: Pillow is told to try
those plugins and no others, so an upload never reaches a plugin that runs an
external program (EPS runs Ghostscript) or a rarely used parser.

The numpy resize uses the same antialiased weights as torch's uint8 resize
(`torchvision.transforms.v2.functional.resize(..., antialias=True)`): a
triangle (bilinear) or Keys cubic with a = -0.5 (bicubic) filter, widened by
the scale factor when shrinking, each output pixel a normalised weighted sum
in fixed point, rounded to uint8, the width first and then the height.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# A truncated JPEG must fail loudly, not come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# The one list of image formats captioner reads (Pillow's format names), everywhere: the server, `caption`,
# `predict`, `Captioner`, feature extraction and the exported runtime.
ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF")
ACCEPTED_NAMES = "JPEG, PNG, BMP, WebP, GIF"

# Every way decoding a file can fail: one bad file must fail alone.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class TooManyPixelsError(ValueError):
    """An image whose header declares more pixels than allowed (a decompression bomb, or just too large)."""


class UnsupportedFormatError(UnidentifiedImageError):
    """Bytes that are not one of `ACCEPTED_FORMATS` (another image format, or not an image at all)."""


def describe_error(error: BaseException) -> str:
    """A short, user-facing reason for an image that could not be read."""
    if isinstance(error, UnidentifiedImageError):
        return f"not an image in an accepted format ({ACCEPTED_NAMES})"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, (Image.DecompressionBombError, TooManyPixelsError)):
        return f"too large to decode safely ({error})"
    return f"unreadable image ({type(error).__name__}: {error})"


def open_accepted(source: str | Path | io.BytesIO | bytes) -> Image.Image:
    """`PIL.Image.open` restricted to `ACCEPTED_FORMATS` (lazy: only the header is read).

    Raises:
        UnsupportedFormatError: For any other format, without handing the bytes to its plugin.
        OSError: When the file cannot be read.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        return Image.open(source, formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as error:
        raise UnsupportedFormatError(str(error)) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white, not black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def check_pixels(image: Image.Image, max_pixels: int | None) -> None:
    """Refuse an opened (not yet decoded) image whose header declares more than `max_pixels` pixels.

    Raises:
        TooManyPixelsError: Over the limit.
    """
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixelsError(f"{width} x {height} = {width * height:,} pixels, over the limit of {max_pixels:,}")


# A JPEG decoded reduced keeps at least this many times the pixels the resize needs on every side: the antialiased
# resize then does most of the filtering, and the encoder's input stays within the tolerance between nvJPEG and
# PIL (features' centred cosine >= 0.99; measured >= 0.997 on scikit-image's photographs at 64 and 224 px, where a
# margin of 1 fell to 0.94).
REDUCED_DECODE_MARGIN = 2


def needed_size(width: int, height: int, definition: dict) -> tuple[int, int]:
    """The smallest `(width, height)` a picture of this size may be decoded at for the encoder's input of
    `definition` (`Preprocessing.to_dict()`): `REDUCED_DECODE_MARGIN` times what its resize reads of each side
    ("squash": the input's side; "shorter": the shorter side at `resize_size`, the longer in proportion)."""
    size = int(definition["image_size"])
    if definition.get("resize", "squash") == "squash":
        wanted = (size, size)
    else:
        scale = int(definition.get("resize_size") or size) / min(width, height)
        wanted = (math.ceil(width * scale), math.ceil(height * scale))
    return min(width, REDUCED_DECODE_MARGIN * wanted[0]), min(height, REDUCED_DECODE_MARGIN * wanted[1])


def reduce_while_decoding(image: Image.Image, definition: dict | None) -> None:
    """Have a JPEG decode at a half, a quarter or an eighth of its size (libjpeg scales in the DCT: PIL's `draft`)
    when that still leaves `needed_size`; other formats decode whole.

    A 12 Mpx photograph for a 224 px encoder decodes at an eighth of its size, several times faster (a 4000 x 2700
    JPEG: 3.5x); the pixels then reach the encoder through the same antialiased resize.
    """
    if definition is not None and image.format == "JPEG":
        image.draft(None, needed_size(*image.size, definition))


def open_image(data: bytes, max_pixels: int | None = None, reduce_for: dict | None = None) -> Image.Image:
    """Decode image bytes into an RGB PIL image, first frame of an animation.

    Args:
        data: The file's bytes.
        max_pixels: Refuse images whose header declares more pixels than this, before decoding them.
        reduce_for: The encoder's preprocessing definition: a large JPEG then decodes at the smallest DCT scale that
            still serves it (`reduce_while_decoding`). None: at full size.

    Raises:
        TooManyPixelsError: Over `max_pixels`.
        UnsupportedFormatError: Not one of `ACCEPTED_FORMATS`.
        One of `DECODE_ERRORS`: Empty, truncated or corrupt.
    """
    with open_accepted(data) as image:
        check_pixels(image, max_pixels)
        image.seek(0)
        reduce_while_decoding(image, reduce_for)
        image.load()
        return to_rgb(image)


# ------------------------------------------------------------------ the resize, as torch computes it
def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """The cubic convolution kernel torch's antialiased bicubic resize (and PIL's) uses."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


# interpolation -> (half the filter's support at scale 1, the filter)
FILTERS: dict[str, tuple[float, Callable[[np.ndarray], np.ndarray]]] = {
    "bilinear": (1.0, _triangle),
    "bicubic": (2.0, _keys_cubic),
}


def _resize_matrix(size_in: int, size_out: int, interpolation: str = "bilinear") -> np.ndarray:
    """`(size_out, size_in)` weights of the antialiased interpolation, as torch computes them."""
    half_support, kernel = FILTERS[interpolation]
    scale = size_in / size_out
    stretch = max(scale, 1.0)  # the filter widens when shrinking (antialiasing)
    support = half_support * stretch
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    for out in range(size_out):
        centre = scale * (out + 0.5)
        start = max(int(centre - support + 0.5), 0)
        stop = min(int(centre + support + 0.5), size_in)
        taps = np.arange(start, stop)
        weights = kernel((taps - centre + 0.5) / stretch)
        total = weights.sum()
        matrix[out, start:stop] = weights / total if total != 0 else 0.0
    return matrix


def _fixed_point(matrix: np.ndarray) -> tuple[np.ndarray, int]:
    """The weights as integers with as many fractional bits as fit an int16, as torch's uint8 kernel keeps them."""
    largest, precision = float(matrix.max()), 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = matrix * (1 << precision)
    return np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64), precision


def _resample(pixels: np.ndarray, size: int, axis: int, interpolation: str) -> np.ndarray:
    """One pass of the separable resize along `axis` (2: width, 1: height) of `(C, H, W)` uint8, rounded to uint8.

    Each output pixel reads only its few taps (a window about twice the scale wide), gathered at once.
    """
    weights, precision = _fixed_point(_resize_matrix(pixels.shape[axis], size, interpolation))
    nonzero = weights != 0
    starts = nonzero.argmax(axis=1)
    taps = int((nonzero.shape[1] - nonzero[:, ::-1].argmax(axis=1) - starts).max())
    wanted = starts[:, None] + np.arange(taps)  # (size, taps); past the edge only where the window is cut short
    index = np.minimum(wanted, pixels.shape[axis] - 1)
    tap_weights = (np.take_along_axis(weights, index, axis=1) * (wanted < pixels.shape[axis])).astype(np.int64)
    values = np.take(pixels, index, axis=axis).astype(np.int64)  # (C, size, taps, W) or (C, H, size, taps)
    if axis == 2:
        summed = (values * tap_weights).sum(axis=-1)
    else:
        summed = (values * tap_weights[:, :, None]).sum(axis=2)
    return np.clip((summed + (1 << (precision - 1))) >> precision, 0, 255).astype(np.uint8)


def resize_chw(pixels: np.ndarray, height: int, width: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resize a `(3, H, W)` uint8 array to `(3, height, width)` as torch's uint8 antialiased resize does."""
    if pixels.shape[2] != width:
        pixels = _resample(pixels, width, axis=2, interpolation=interpolation)
    if pixels.shape[1] != height:
        pixels = _resample(pixels, height, axis=1, interpolation=interpolation)
    return pixels


def shorter_side_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """The `(height, width)` that brings the shorter side to `shorter`, keeping the aspect ratio (torchvision's)."""
    if width <= height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


def centre_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """The top-left corner of torchvision's centre crop of `size` x `size`."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def preprocess_array(image: np.ndarray, definition: dict) -> np.ndarray:
    """An `(H, W, 3)` uint8 RGB array as the encoder's `(3, S, S)` uint8 input, following a preprocessing definition.

    Args:
        image: The decoded picture.
        definition: `Preprocessing.to_dict()` (from a checkpoint or an export manifest).
    """
    size, interpolation = int(definition["image_size"]), definition.get("interpolation", "bilinear")
    pixels = np.ascontiguousarray(image.transpose(2, 0, 1))
    if definition.get("resize", "squash") == "squash":
        return resize_chw(pixels, size, size, interpolation)
    shorter = int(definition.get("resize_size") or size)
    pixels = resize_chw(pixels, *shorter_side_size(pixels.shape[1], pixels.shape[2], shorter), interpolation)
    top, left = centre_crop_box(pixels.shape[1], pixels.shape[2], size)
    return np.ascontiguousarray(pixels[:, top : top + size, left : left + size])


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """Squash an `(H, W, 3)` uint8 array to `(3, size, size)` uint8 with antialiased bilinear interpolation."""
    return preprocess_array(image, {"image_size": size, "resize": "squash", "interpolation": "bilinear"})


PLACE_MODULUS, PLACE_WEIGHTS = 2**61 - 1, 65521


def image_places(images: Any) -> list[int]:
    """A number per image of a `(B, 3, S, S)` uint8 batch (NumPy array or torch tensor, on any device), computed from
    its pixels in exact integer arithmetic: the same for the same picture in every batch, process and backend. A
    sampled caption's random stream is seeded by it (`captioner.decoding.search.RowStreams`), so an image samples the
    same caption whatever its batch-mates and whichever captioner, server or job it went through."""
    flat = images.reshape(images.shape[0], -1)
    if isinstance(flat, np.ndarray):
        weights = np.arange(flat.shape[1], dtype=np.int64) % PLACE_WEIGHTS + 1
        return ((flat.astype(np.int64) * weights).sum(axis=1) % PLACE_MODULUS).tolist()
    import torch  # a tensor was given: torch is there

    weights = torch.arange(flat.shape[1], dtype=torch.int64, device=flat.device) % PLACE_WEIGHTS + 1
    return ((flat.to(torch.int64) * weights).sum(dim=1) % PLACE_MODULUS).tolist()
