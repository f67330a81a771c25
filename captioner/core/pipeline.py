"""Images to decoded batches, ahead of whoever consumes them: a bounded pool of decode threads, then batches
assembled `prefetch` ahead (torch-free; nothing of captioner's beyond `core`).

    ImageInput (a path, bytes, a PIL image, an array or tensor, a shard's sample)
      ─> decode threads (`PixelDecoder.host`: PIL releases the interpreter; large JPEGs decode reduced)
      ─> a batch assembled in a thread of its own once its images are decoded (JPEGs decoded on the device,
         pixels stacked, pinned and copied there: `PixelDecoder.on_device`, `stack`)
      ─> `DecodedBatch`, in order, the next `prefetch` batches decoding while the consumer works on this one

The captioning engine (`captioner.inference.engine`) consumes them with the search, feature extraction
(`captioner.features.extraction`) with the encoder: one decode path for both.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from captioner.core.pixels import DECODE_ERRORS, describe_error

DEFAULT_DECODE_THREADS = 4
DEFAULT_PREFETCH = 2


@dataclass
class DecodedBatch:
    """A batch of images after decoding: those that decoded stacked for the model, the others with their reason.

    Attributes:
        names: Every image's name, in order.
        pixels: `(len(ok), 3, S, S)` uint8 (a tensor on the model's device, or a NumPy array); None when none
            decoded.
        ok: The positions (in `names`) of the decoded images, in the order of `pixels`.
        errors: Position -> why that image could not be decoded.
        payloads: What the caller attached to each image (its `ImageInput`), in order.
    """

    names: list[str]
    pixels: Any
    ok: list[int]
    errors: dict[int, str]
    payloads: list[Any] = field(default_factory=list)


@dataclass
class ImageInput:
    """One image to caption, not decoded yet.

    Attributes:
        name: How its row names it: a path as given, `<shard>#<member>`, `<Image #3>` for one in memory.
        data: The encoded file's bytes, a path to read them from, an image already decoded (a PIL image, an
            `(H, W, 3)` array, a `(3, H, W)` tensor), or the exception saying why it cannot be read.
        payload: Anything the caller wants back beside the row (a shard sample's members, to copy them out).
    """

    name: str
    data: Any
    payload: Any = None


def as_inputs(images: Iterable[Any]) -> Iterator[ImageInput]:
    """Images in any form as `ImageInput`s: paths named as given, anything in memory by its kind and place."""
    for index, item in enumerate(images):
        if isinstance(item, ImageInput):
            yield item
        elif isinstance(item, (str, Path)):
            yield ImageInput(str(item), Path(item))
        else:
            yield ImageInput(f"<{type(item).__name__} #{index}>", item)


class PixelDecoder(Protocol):
    """How a captioner's images become its model's input (`captioner.encoders.image_files.TorchPixels` for
    checkpoints, `captioner.inference.exported.NumpyPixels` for exports)."""

    def host(self, data: Any, max_pixels: int | None = None) -> Any:
        """Bytes or a decoded image as the encoder's `(3, S, S)` uint8 input, on the host (thread-safe).

        Raises:
            One of `captioner.core.pixels.DECODE_ERRORS`.
        """

    def for_device(self, data: bytes, max_pixels: int | None = None) -> bool:
        """Whether these bytes go to the device's decoder (a header check; False where there is none).

        Raises:
            One of `DECODE_ERRORS` when the header says the image cannot be read, or has more than `max_pixels`.
        """

    def on_device(self, encoded: list[bytes]) -> list[Any]:
        """Decode these files on the device: each one's input, or the exception saying why it cannot be read."""

    def stack(self, pixels: list[Any]) -> Any:
        """One `(B, 3, S, S)` batch on the captioning device (the copy started without waiting for it)."""


@dataclass
class _Deferred:
    """An image left to the device's decoder."""

    data: bytes


def prepare(decoder: PixelDecoder, item: ImageInput, max_pixels: int | None) -> Any:
    """One image read and decoded on the host, or left to the device (`_Deferred`), or why it cannot be (a str)."""
    data = item.data
    if isinstance(data, BaseException):  # why the caller could not read it
        return describe_error(data) if isinstance(data, DECODE_ERRORS) else str(data)
    try:
        if isinstance(data, Path):
            data = data.read_bytes()
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
            if decoder.for_device(data, max_pixels):
                return _Deferred(data)
        return decoder.host(data, max_pixels)
    except (*DECODE_ERRORS, TypeError) as error:
        return describe_error(error)


def assemble(decoder: PixelDecoder, items: list[ImageInput], prepared: list[Any]) -> DecodedBatch:
    """A batch from its images as `prepare` left them: the deferred ones decoded on the device, all stacked there."""
    deferred = [index for index, value in enumerate(prepared) if isinstance(value, _Deferred)]
    if deferred:
        for index, value in zip(deferred, decoder.on_device([prepared[i].data for i in deferred])):
            prepared[index] = describe_error(value) if isinstance(value, BaseException) else value
    ok = [index for index, value in enumerate(prepared) if not isinstance(value, str)]
    errors = {index: value for index, value in enumerate(prepared) if isinstance(value, str)}
    pixels = decoder.stack([prepared[index] for index in ok]) if ok else None
    return DecodedBatch([item.name for item in items], pixels, ok, errors, list(items))


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class PipelineStats:
    """Where a pipeline's time went: images and batches through it, seconds the consumer waited for a batch to be
    decoded, and seconds it spent on batches (captioning or encoding; counted by the consumer)."""

    images: int = 0
    batches: int = 0
    waited_s: float = 0.0
    busy_s: float = 0.0

    @property
    def waiting_share(self) -> float:
        """The share of the consumer's time spent waiting for images (0: the device never waited)."""
        total = self.waited_s + self.busy_s
        return self.waited_s / total if total else 0.0


def decoded_batches(
    inputs: Iterable[ImageInput],
    decoder: PixelDecoder,
    batch_size: int,
    threads: int = DEFAULT_DECODE_THREADS,
    prefetch: int = DEFAULT_PREFETCH,
    max_pixels: int | None = None,
    stats: PipelineStats | None = None,
) -> Iterator[DecodedBatch]:
    """`inputs` decoded and stacked `batch_size` at a time, in order, the next `prefetch` batches decoding while the
    caller works on this one.

    Images decode in `threads` threads; each batch is assembled (device decoding, stacking, the copy to the device)
    in a thread of its own once its images are decoded. At most `prefetch` + 1 batches are held decoded or decoding
    beside the caller's, so memory stays bounded however long `inputs` is (it is read as the batches go).

    Args:
        inputs: The images (read lazily).
        decoder: How they become the model's input.
        batch_size: Images per batch.
        threads: Images decoded at once.
        prefetch: Batches decoded ahead of the one the caller holds (0: none, decode then caption).
        max_pixels: Refuse images whose header declares more pixels (None: Pillow's bomb limit only).
        stats: Filled with where the time went.
    """
    stats = stats if stats is not None else PipelineStats()
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="captioner-decode")
    assembler = ThreadPoolExecutor(max(1, prefetch), thread_name_prefix="captioner-batch")

    def build(items: list[ImageInput], futures: list[Future]) -> DecodedBatch:
        return assemble(decoder, items, [future.result() for future in futures])

    pending: deque[Future] = deque()

    def take() -> DecodedBatch:
        started = time.perf_counter()
        batch = pending.popleft().result()
        stats.waited_s += time.perf_counter() - started
        stats.images += len(batch.names)
        stats.batches += 1
        return batch

    try:
        for chunk in _chunks(inputs, max(1, batch_size)):
            futures = [pool.submit(prepare, decoder, item, max_pixels) for item in chunk]
            pending.append(assembler.submit(build, chunk, futures))
            while len(pending) > max(0, prefetch):
                yield take()
        while pending:
            yield take()
    finally:
        for future in pending:
            future.cancel()
        assembler.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
