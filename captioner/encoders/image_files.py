"""Image files to the encoder's input: a dataset of files decoded by loader workers (Lightning's `predict`), and
`TorchPixels`, the engine's decoder for checkpoints (`captioner.inference.engine`), which decodes on the host with
PIL or JPEGs in batches on a GPU.

Every path follows the encoder's `captioner.encoders.preprocessing.Preprocessing`: the CPU path decodes with PIL
(large JPEGs reduced in the DCT); the device path sends JPEG bytes to the GPU (nvJPEG) and resizes them there with
the same torch resize. Files the device cannot decode (other formats, CMYK JPEGs, truncated files) take the CPU
path, so a bad file fails alone, the same way on both paths.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from captioner.core.pixels import check_pixels, describe_error, open_accepted
from captioner.encoders.preprocessing import DECODE_ERRORS, Preprocessing

JPEG_MAGIC, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
DEVICE_DECODABLE_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB; CMYK and others go through PIL

# Names the decode path in feature cache keys ("pil" before large JPEGs were decoded reduced).
CPU_DECODE = "pil-reduced"
DEVICE_DECODE = "nvjpeg+pil"


def load_any_image(source: str | Path | Image.Image | torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """A path, a PIL image or an image tensor (on any device) as a `(3, S, S)` uint8 CPU tensor.

    Raises:
        One of `DECODE_ERRORS` when a file cannot be read or a tensor has the wrong shape.
    """
    if isinstance(source, Image.Image):
        return preprocessing.from_pil(source)
    if isinstance(source, torch.Tensor):
        return preprocessing.from_tensor(source)
    return preprocessing.from_file(source)


class ImageFileDataset(Dataset):
    """Image files decoded and resized in DataLoader workers.

    Each item is `(position, path, image or None, error or None)`, so a bad
    file fails alone and the batch goes on.
    """

    def __init__(self, paths: Sequence[str | Path], preprocessing: Preprocessing) -> None:
        self.paths = list(paths)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, str, torch.Tensor | None, str | None]:
        path = str(self.paths[position])
        try:
            return position, path, self.preprocessing.from_file(path), None
        except DECODE_ERRORS as error:
            return position, path, None, describe_error(error)


def collate_images(items: list[tuple[int, str, torch.Tensor | None, str | None]]) -> dict:
    """Stack the readable images of a batch and keep the errors of the others.

    Returns:
        A dict with `paths` (all items), `images` (`(n_ok, 3, S, S)` uint8), `ok` (the positions in the batch of the
        stacked images) and `errors` (position in the batch -> reason): a `DecodedBatch`'s fields.
    """
    ok = [(index, image) for index, (_, _, image, _) in enumerate(items) if image is not None]
    return {
        "paths": [path for _, path, _, _ in items],
        "ok": [index for index, _ in ok],
        "images": torch.stack([image for _, image in ok]) if ok else torch.empty(0, 3, 0, 0, dtype=torch.uint8),
        "errors": {index: error for index, (_, _, _, error) in enumerate(items) if error is not None},
    }


def device_decodable(data: bytes, max_pixels: int | None = None) -> bool:
    """Whether the device should decode these bytes: a complete RGB or greyscale JPEG within the pixel limits.

    Reads only the header. A decompression bomb raises here, exactly as it
    would on the CPU path (`PIL.Image.open` checks the pixel count, and
    `max_pixels` is checked as the CPU path checks it). A JPEG without its end
    marker is truncated: it goes to PIL, which refuses it, where nvJPEG might
    return a half-grey picture.

    Raises:
        One of `DECODE_ERRORS` when the header cannot be read or the image is too large.
    """
    if not data.startswith(JPEG_MAGIC) or not data.rstrip(b"\0 \r\n").endswith(JPEG_END):
        return False
    with open_accepted(data) as image:
        check_pixels(image, max_pixels)
        return image.format == "JPEG" and image.mode in DEVICE_DECODABLE_MODES


def _wait_for_device(device: torch.device) -> None:
    """Let queued work on the decoded buffers finish before they can be freed and reused.

    torchvision decodes on a private CUDA stream while the resize runs on the
    current one; without this, a buffer freed after the resize was queued (not
    run) could be handed to the next decode.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resized_by_shape(positions: list[int], images: list[torch.Tensor], preprocessing: Preprocessing) -> dict:
    """Resize images of the same size in one call each: one kernel launch per size, not per image."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(index)
    resized = {}
    for indices in by_shape.values():
        batch = preprocessing.resize_tensor(torch.stack([images[i] for i in indices]))
        resized.update((positions[i], image) for i, image in zip(indices, batch))
    return resized


def _decode_on_device(encoded: list[bytes], preprocessing: Preprocessing, device: torch.device) -> list[Any]:
    """JPEGs decoded on `device` in one call (nvJPEG on CUDA) and resized there: each one's input, or why it cannot
    be read. If the batched call fails each is retried alone, and then on the CPU with PIL, so one bad file never
    costs the others and fails the way it would on the CPU path."""
    raws = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    try:
        decoded = decode_jpeg(raws, mode=ImageReadMode.RGB, device=device)
        resized = _resized_by_shape(list(range(len(raws))), decoded, preprocessing)
        return [resized[index] for index in range(len(raws))]
    except RuntimeError:
        _wait_for_device(device)
    results: list[Any] = []
    for data, raw in zip(encoded, raws):
        try:
            results.append(preprocessing.resize_tensor(decode_jpeg(raw, ImageReadMode.RGB, device=device)))
            _wait_for_device(device)
        except RuntimeError:
            try:
                results.append(preprocessing.from_file(data, reduced=False).to(device))
            except DECODE_ERRORS as error:
                results.append(error)
    return results


class TorchPixels:
    """How a checkpoint's images become its encoder's input (`captioner.inference.engine.PixelDecoder`): PIL on the
    host (large JPEGs decoded reduced), and, with `device_decode` on a GPU, JPEGs decoded there by nvJPEG in batches.

    Batches are assembled in the engine's threads, each with a CUDA stream of its own: the copy of host pixels (from
    pinned memory, without blocking) and the device's decoding overlap the model's work on the previous batch, and a
    batch is handed over only once its stream is done.

    Args:
        preprocessing: The encoder's definition.
        device: Where the model runs.
        device_decode: Decode complete RGB and greyscale JPEGs on the device (None: on a GPU).
    """

    def __init__(
        self, preprocessing: Preprocessing, device: torch.device | str = "cpu", device_decode: bool | None = None
    ) -> None:
        self.preprocessing, self.device = preprocessing, torch.device(device)
        self.device_decode = self.device.type == "cuda" if device_decode is None else device_decode
        self._local = threading.local()

    def host(self, data: Any, max_pixels: int | None = None) -> torch.Tensor:
        """Bytes, a PIL image, an `(H, W, 3)` uint8 array or an image tensor as a `(3, S, S)` uint8 CPU tensor.

        Raises:
            One of `DECODE_ERRORS`; TypeError for anything that is not an image.
        """
        if isinstance(data, (bytes, bytearray, io.BytesIO)):
            return self.preprocessing.from_file(data if not isinstance(data, bytearray) else bytes(data), max_pixels)
        if isinstance(data, Image.Image):
            return self.preprocessing.from_pil(data)
        if isinstance(data, torch.Tensor):
            return self.preprocessing.from_tensor(data)
        if hasattr(data, "__array__") and getattr(data, "ndim", 0) == 3 and data.shape[-1] in (1, 3):
            return self.preprocessing.from_tensor(torch.as_tensor(data).permute(2, 0, 1))
        raise TypeError(f"not an image: {type(data).__name__} (give a path, bytes, a PIL image, an array or a tensor)")

    def for_device(self, data: bytes, max_pixels: int | None = None) -> bool:
        return self.device_decode and device_decodable(data, max_pixels)

    def _stream(self):
        """The calling thread's own CUDA stream (a no-op context elsewhere)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if not hasattr(self._local, "stream"):
            self._local.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._local.stream)

    def on_device(self, encoded: list[bytes]) -> list[Any]:
        with self._stream():
            return _decode_on_device(encoded, self.preprocessing, self.device)

    def stack(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """One batch on the device: host pixels stacked (in pinned memory on a GPU) and copied without blocking."""
        if self.device.type == "cpu":
            return torch.stack([image.cpu() for image in pixels])
        with self._stream():
            if all(image.device.type == "cpu" for image in pixels):
                batch = torch.stack(pixels).pin_memory().to(self.device, non_blocking=True)
            else:
                batch = torch.stack([image.to(self.device, non_blocking=True) for image in pixels])
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # complete before another stream reads it
            return batch
