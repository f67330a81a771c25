"""Pixels without torch: opening image bytes safely, RGB conversion, and the resize, in numpy.

Shared by every captioning path: the torch paths (`captioner.data.preprocessing`)
and the torch-free ONNX runtime (`captioner.runtime`), which must import without
torch. The numpy resize uses the same antialiased bilinear weights as torch's
(`torchvision.transforms.v2.functional.resize(..., antialias=True)`): a triangle
filter widened by the scale factor when shrinking, each output pixel a
normalised weighted sum, rounded to uint8.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# A truncated JPEG must fail loudly, not come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Every way decoding a file can fail: one bad file must fail alone.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def describe_error(error: BaseException) -> str:
    """A short, user-facing reason for an image that could not be read."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image (or an unsupported format)"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, (Image.DecompressionBombError, TooManyPixelsError)):
        return f"too large to decode safely ({error})"
    return f"unreadable image ({type(error).__name__}: {error})"


class TooManyPixelsError(ValueError):
    """An image whose header declares more pixels than allowed (a decompression bomb, or just too large)."""


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


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes fully into an RGB PIL image, first frame of an animation.

    Args:
        data: The file's bytes.
        max_pixels: Refuse images whose header declares more pixels than this, before decoding them.

    Raises:
        TooManyPixelsError: Over `max_pixels`.
        One of `DECODE_ERRORS`: Empty, not an image, truncated or corrupt.
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            pixels = width * height
            raise TooManyPixelsError(f"{width} x {height} = {pixels:,} pixels, over the limit of {max_pixels:,}")
        image.seek(0)
        image.load()
        return to_rgb(image)


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """`(size_out, size_in)` weights of antialiased bilinear interpolation, as torch computes them."""
    scale = size_in / size_out
    support = max(scale, 1.0)  # bilinear's support of 1, widened when shrinking
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    for out in range(size_out):
        centre = scale * (out + 0.5)
        start = max(int(centre - support + 0.5), 0)
        stop = min(int(centre + support + 0.5), size_in)
        taps = np.arange(start, stop)
        weights = np.maximum(0.0, 1.0 - np.abs((taps - centre + 0.5) / support))
        total = weights.sum()
        matrix[out, start:stop] = weights / total if total > 0 else 0.0
    return matrix


def _fixed_point(matrix: np.ndarray) -> tuple[np.ndarray, int]:
    """The weights as integers with as many fractional bits as fit an int16, as torch's uint8 kernel keeps them."""
    largest, precision = float(matrix.max()), 0
    while precision < 15 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = matrix * (1 << precision)
    return np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64), precision


def _resample(pixels: np.ndarray, size: int, axis: int) -> np.ndarray:
    """One pass of the separable resize along `axis` (2: width, 1: height) of `(C, H, W)` uint8, rounded to uint8.

    Each output pixel reads only its few taps (a window about twice the scale wide), gathered at once.
    """
    weights, precision = _fixed_point(_resize_matrix(pixels.shape[axis], size))
    nonzero = weights != 0
    starts = nonzero.argmax(axis=1)
    taps = int((nonzero.shape[1] - nonzero[:, ::-1].argmax(axis=1) - starts).max())
    wanted = starts[:, None] + np.arange(taps)  # (size, taps); past the edge only where the window is cut short
    index = np.minimum(wanted, pixels.shape[axis] - 1)
    tap_weights = (np.take_along_axis(weights, index, axis=1) * (wanted < pixels.shape[axis])).astype(np.int32)
    values = np.take(pixels, index, axis=axis).astype(np.int32)  # (C, size, taps, W) or (C, H, size, taps)
    if axis == 2:
        summed = (values * tap_weights).sum(axis=-1)
    else:
        summed = (values * tap_weights[:, :, None]).sum(axis=2)
    return np.clip((summed + (1 << (precision - 1))) >> precision, 0, 255).astype(np.uint8)


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """Squash an `(H, W, 3)` uint8 array to `(3, size, size)` uint8 with antialiased bilinear interpolation.

    As torch does it for uint8 images: fixed-point weights, the width first, rounded to uint8, then the height.
    """
    pixels = np.ascontiguousarray(image.transpose(2, 0, 1))
    if pixels.shape[2] != size:
        pixels = _resample(pixels, size, axis=2)
    if pixels.shape[1] != size:
        pixels = _resample(pixels, size, axis=1)
    return pixels
