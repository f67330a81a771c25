"""Image files to the encoder's input: datasets of files decoded by workers, and batched decoding on a GPU.

Every path follows the encoder's `captioner.encoders.preprocessing.Preprocessing`: the CPU path
decodes with PIL in DataLoader workers; the device path sends JPEG bytes to
the GPU (nvJPEG) and resizes them there with the same torch resize. Files the
device cannot decode (other formats, CMYK JPEGs, truncated files) take the CPU
path, so a bad file fails alone, the same way on both paths.
"""

from __future__ import annotations

import io
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from captioner.core.pixels import describe_error, open_accepted
from captioner.encoders.preprocessing import DECODE_ERRORS, Preprocessing

JPEG_MAGIC, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
DEVICE_DECODABLE_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB; CMYK and others go through PIL

# Names the decode path in cache keys and checkpoints.
CPU_DECODE = "pil"
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


def device_decodable(data: bytes) -> bool:
    """Whether the device should decode these bytes: a complete RGB or greyscale JPEG within PIL's pixel limit.

    Reads only the header. A decompression bomb raises here, exactly as it
    would on the CPU path (`PIL.Image.open` checks the pixel count). A JPEG
    without its end marker is truncated: it goes to PIL, which refuses it,
    where nvJPEG might return a half-grey picture.

    Raises:
        One of `DECODE_ERRORS` when the header cannot be read or the image is too large.
    """
    if not data.startswith(JPEG_MAGIC) or not data.rstrip(b"\0 \r\n").endswith(JPEG_END):
        return False
    with open_accepted(data) as image:
        return image.format == "JPEG" and image.mode in DEVICE_DECODABLE_MODES


class EncodedFileDataset(Dataset):
    """Image files for decoding on the device that runs the encoder (GPU JPEG decoding).

    Complete RGB and greyscale JPEGs come back as their raw bytes, to be decoded
    in batches by `decode_on_device`; anything else is decoded here, on the CPU.
    Items: `(position, path, jpeg bytes or None, image or None, error or None)`.
    """

    def __init__(self, paths: Sequence[str | Path], preprocessing: Preprocessing) -> None:
        self.paths = list(paths)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        path = str(self.paths[position])
        try:
            data = Path(path).read_bytes()
            if device_decodable(data):
                return position, path, torch.frombuffer(bytearray(data), dtype=torch.uint8), None, None
            return position, path, None, self.preprocessing.from_file(io.BytesIO(data)), None
        except DECODE_ERRORS as error:
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


def decode_on_device(batch: dict, preprocessing: Preprocessing, device: torch.device | str) -> dict:
    """Decode a `collate_encoded` batch's JPEGs on `device` (nvJPEG on CUDA), resize there, and stack.

    The JPEGs of a batch are decoded in one call; if that fails each is
    retried alone, and then on the CPU with PIL, so one bad file never costs
    the others and fails the way it would on the CPU path.

    Returns:
        The same dict as `collate_images`, with `images` on `device`.
    """
    device = torch.device(device)
    images = {p: image.to(device, non_blocking=True) for p, image in batch["decoded"].items()}
    errors = dict(batch["errors"])
    positions, raws = list(batch["jpegs"]), list(batch["jpegs"].values())
    if raws:
        try:
            decoded = decode_jpeg(raws, mode=ImageReadMode.RGB, device=device)
            images.update(_resized_by_shape(positions, decoded, preprocessing))
        except RuntimeError:
            _wait_for_device(device)
            for position, raw in zip(positions, raws):
                try:
                    images[position] = preprocessing.resize_tensor(decode_jpeg(raw, ImageReadMode.RGB, device=device))
                    _wait_for_device(device)
                except RuntimeError:
                    try:
                        images[position] = preprocessing.from_file(io.BytesIO(raw.numpy().tobytes())).to(device)
                    except DECODE_ERRORS as error:
                        errors[position] = describe_error(error)
    ok = [p for p in batch["positions"] if p in images]
    size = preprocessing.image_size
    stacked = torch.stack([images[p] for p in ok]) if ok else torch.empty(0, 3, size, size, dtype=torch.uint8)
    _wait_for_device(device)
    return {"positions": batch["positions"], "paths": batch["paths"], "ok": ok, "images": stacked.to(device),
            "errors": errors}  # fmt: skip


def decoded_ahead(batches: Iterable[dict], preprocessing: Preprocessing, device: torch.device | str,
                  threads: int = 2) -> Iterator[dict]:  # fmt: skip
    """`decode_on_device` over `collate_encoded` batches, up to `threads` batches ahead in threads of their own,
    each with its own CUDA stream; batches come back in order.

    The device decodes (and nvJPEG's host side runs, without the GIL) the next batches while the caller encodes
    this one: one decode thread left the encoder idle for every decode, and bound extraction to one decode stream.
    """
    device = torch.device(device)
    local = threading.local()

    def decode(batch: dict) -> dict:
        if device.type != "cuda":
            return decode_on_device(batch, preprocessing, device)
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(local.stream):
            return decode_on_device(batch, preprocessing, device)  # which waits for its work before returning

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="device-decode") as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(decode, batch))
            if len(pending) > max(1, threads):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
