"""Image decoding and resizing shared by feature extraction, predict and the Python API.

Every source (JPEG, PNG, BMP, WebP, the first frame of a GIF; grayscale, CMYK,
palette, alpha) becomes a `(3, size, size)` uint8 RGB tensor. Normalisation to
the backbone's statistics happens inside the encoder, on the device that runs it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")

# A truncated JPEG must fail loudly, not come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


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


def resize_image(image: Image.Image, size: int) -> torch.Tensor:
    """Squash a PIL image to `size` x `size` (captions describe the whole frame, so no crop)."""
    image = to_rgb(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return TF.pil_to_tensor(image)


def load_image(path: str | Path | io.BytesIO, size: int) -> torch.Tensor:
    """Decode an image file (or its bytes) into a `(3, size, size)` uint8 RGB tensor.

    JPEGs are decoded at reduced scale when they are much larger than `size`
    (libjpeg's DCT scaling), which is several times faster than full decoding.

    Raises:
        OSError: When the file cannot be read or is not a decodable image.
    """
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # only JPEG honours this; a no-op for other formats
        image.seek(0)  # the first frame of an animation
        image.load()
        return resize_image(image, size)


@dataclass
class FolderScan:
    """Image files found under a folder, and what could not be looked into."""

    images: list[Path] = field(default_factory=list)
    unreadable_folders: list[str] = field(default_factory=list)
    skipped_links: list[str] = field(default_factory=list)


def find_images(folder: str | Path) -> FolderScan:
    """All image files under `folder`, recursively, sorted.

    Symbolic links to folders are not followed (no loops, no escaping the
    tree); links to files are. Folders that cannot be listed are recorded,
    not fatal.
    """
    scan = FolderScan()

    def unreadable(error: OSError) -> None:
        scan.unreadable_folders.append(f"{error.filename}: {error.strerror}")

    for directory, folders, files in os.walk(folder, onerror=unreadable, followlinks=False):
        for name in folders:
            if os.path.islink(os.path.join(directory, name)):
                scan.skipped_links.append(os.path.join(directory, name))
        for name in files:
            path = Path(directory) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                if path.is_symlink() and not path.exists():
                    scan.skipped_links.append(str(path))
                    continue
                scan.images.append(path)
    scan.images.sort()
    return scan


def load_any_image(source: str | Path | Image.Image | torch.Tensor, size: int) -> torch.Tensor:
    """A path, a PIL image or an image tensor as a `(3, size, size)` uint8 tensor.

    Tensors may be `(3, H, W)` or `(1, H, W)`, uint8 in [0, 255] or float in [0, 1].

    Raises:
        OSError: When a file cannot be read.
        ValueError: When a tensor has another shape.
    """
    if isinstance(source, Image.Image):
        return resize_image(source, size)
    if isinstance(source, torch.Tensor):
        if source.ndim != 3 or source.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be (3, H, W) or (1, H, W), got {tuple(source.shape)}")
        image = source if source.dtype == torch.uint8 else (source.clamp(0, 1) * 255).round().to(torch.uint8)
        image = image.expand(3, -1, -1)
        return TF.resize(image, [size, size], antialias=True)
    return load_image(source, size)


def describe_error(error: BaseException) -> str:
    """A short, user-facing reason for an image that could not be read."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image (or an unsupported format)"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, Image.DecompressionBombError):
        return f"too large to decode safely ({error})"
    return f"unreadable image ({type(error).__name__}: {error})"


class ImageFileDataset(Dataset):
    """Image files decoded and resized in DataLoader workers.

    Each item is `(position, path, image or None, error or None)`, so a bad
    file fails alone and the batch goes on.
    """

    def __init__(self, paths: Sequence[str | Path], size: int) -> None:
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, str, torch.Tensor | None, str | None]:
        path = str(self.paths[position])
        try:
            return position, path, load_image(path, self.size), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return position, path, None, describe_error(error)


def collate_images(items: list[tuple[int, str, torch.Tensor | None, str | None]]) -> dict:
    """Stack the readable images of a batch and keep the errors of the others.

    Returns:
        A dict with `positions` and `paths` (all items), `images`
        (`(n_ok, 3, S, S)` uint8), `ok` (positions of the stacked images) and
        `errors` (position -> reason).
    """
    ok = [(position, image) for position, _, image, _ in items if image is not None]
    return {
        "positions": [position for position, _, _, _ in items],
        "paths": [path for _, path, _, _ in items],
        "ok": [position for position, _ in ok],
        "images": torch.stack([image for _, image in ok]) if ok else torch.empty(0, 3, 0, 0, dtype=torch.uint8),
        "errors": {position: error for position, _, _, error in items if error is not None},
    }


JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedFileDataset(Dataset):
    """Image files for decoding on the device that runs the encoder (GPU JPEG decoding).

    JPEG files come back as their raw bytes, to be decoded in batches by
    `decode_on_device`; any other format is decoded here, on the CPU, as a
    fallback. Items: `(position, path, jpeg bytes or None, image or None, error or None)`.
    """

    def __init__(self, paths: Sequence[str | Path], size: int) -> None:
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        path = str(self.paths[position])
        try:
            data = Path(path).read_bytes()
            if data.startswith(JPEG_MAGIC):
                return position, path, torch.frombuffer(bytearray(data), dtype=torch.uint8), None, None
            return position, path, None, load_image(io.BytesIO(data), self.size), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return position, path, None, None, describe_error(error)


def collate_encoded(items: list) -> dict:
    """Keep JPEG bytes and CPU-decoded images apart until `decode_on_device` joins them."""
    return {
        "positions": [item[0] for item in items],
        "paths": [item[1] for item in items],
        "jpegs": {item[0]: item[2] for item in items if item[2] is not None},
        "decoded": {item[0]: item[3] for item in items if item[3] is not None},
        "errors": {item[0]: item[4] for item in items if item[4] is not None},
    }


def decode_on_device(batch: dict, size: int, device: torch.device) -> dict:
    """Decode a `collate_encoded` batch's JPEGs on `device` (nvJPEG on CUDA), resize there, and stack.

    The JPEGs of a batch are decoded in one call; if that fails (a corrupt
    file, a mode the decoder lacks such as CMYK) each is retried alone, and
    then on the CPU with PIL, so one bad file never costs the others.

    Returns:
        The same dict as `collate_images`, with `images` on `device`.
    """
    images: dict[int, torch.Tensor] = {p: image.to(device, non_blocking=True) for p, image in batch["decoded"].items()}
    errors = dict(batch["errors"])
    positions, raws = list(batch["jpegs"]), list(batch["jpegs"].values())

    def finish(position: int, decoded: torch.Tensor) -> None:
        images[position] = TF.resize(decoded, [size, size], antialias=True)

    if raws:
        try:
            for position, decoded in zip(positions, decode_jpeg(raws, mode=ImageReadMode.RGB, device=device)):
                finish(position, decoded)
        except RuntimeError:
            for position, raw in zip(positions, raws):
                try:
                    finish(position, decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    try:
                        images[position] = load_image(io.BytesIO(raw.numpy().tobytes()), size).to(device)
                    except (OSError, ValueError, SyntaxError) as error:
                        errors[position] = describe_error(error)
    ok = [p for p in batch["positions"] if p in images]
    empty = torch.empty(0, 3, size, size, dtype=torch.uint8, device=device)
    return {
        "positions": batch["positions"],
        "paths": batch["paths"],
        "ok": ok,
        "images": torch.stack([images[p] for p in ok]) if ok else empty,
        "errors": errors,
    }
