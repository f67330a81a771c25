"""The one extraction pipeline every feature store uses: image parts decoded in threads (JPEGs with nvJPEG on a GPU),
batched, encoded, and handed to the store's writer a part at a time; parts done are skipped (resume), parts are shared
out over the ranks of a distributed run, and rank 0 assembles them when all are done.

    parts ─> decoded batches ─> encoder (bf16 autocast where native; chunks halved on out-of-memory)
          ─> PartWriter.write(names, features, failures) ─> PartWriter.finish(part)  (atomic: the part is done)
    every rank its parts, barrier, rank 0: FeatureSink.assemble(parts), barrier

A store supplies the `FeatureSink` (where parts go and how they become one set):
the memory-mapped cache (`captioner.features.cache`) and the streamed shards
(`captioner.features.streamed`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from captioner.core.errors import CaptionerError
from captioner.core.pixels import DECODE_ERRORS, describe_error
from captioner.encoders.image_files import collate_encoded, decoded_ahead, device_decodable
from captioner.features.keys import FeatureSpec, extraction_method
from captioner.features.sources import ImagePart

log = logging.getLogger(__name__)


def default_batch_size(device: torch.device) -> int:
    """Images per encoder pass: large on a GPU; small on a CPU, where bigger batches only add cache misses."""
    return 256 if device.type == "cuda" else 8


def free_device_memory(device: torch.device) -> None:
    """Return the caching allocator's free blocks to the device (after the failed chunk's tensors are gone)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def encode_in_chunks(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     chunk: list[int]) -> torch.Tensor:  # fmt: skip
    """Run the encoder over `images` in chunks of `chunk[0]`, halving it (for good) on out-of-memory."""
    while True:
        try:
            return torch.cat([forward(images[i : i + chunk[0]]) for i in range(0, len(images), chunk[0])])
        except torch.OutOfMemoryError:
            pass  # leave the except block first: its traceback holds the failed chunk's activations
        if chunk[0] == 1:
            raise CaptionerError(
                "The encoder runs out of device memory even on one image; use a smaller encoder input size "
                "or extract on the CPU (--trainer.accelerator cpu)."
            )
        chunk[0] //= 2
        free_device_memory(images.device)
        log.warning("Out of device memory while extracting features: retrying with batches of %d.", chunk[0])


@dataclass
class DecodedBatch:
    """Images of a part, decoded: `images` `(n, 3, S, S)` uint8 for `ok` (their names), `errors` for the rest."""

    names: list[str]
    ok: list[str]
    images: torch.Tensor
    errors: dict[str, str]


def _decode_one(preprocessing: Any, name: str, data: bytes | BaseException) -> tuple[str, torch.Tensor | str]:
    if isinstance(data, BaseException):
        return name, describe_error(data) if isinstance(data, DECODE_ERRORS) else str(data)
    try:
        return name, preprocessing.from_file(data)
    except DECODE_ERRORS as error:
        return name, describe_error(error)


def _for_the_device(preprocessing: Any, name: str, data: bytes | BaseException) -> tuple:
    """`collate_encoded`'s item: complete RGB or greyscale JPEGs as bytes for nvJPEG, anything else decoded here."""
    if not isinstance(data, BaseException):
        try:
            if device_decodable(data):
                return 0, name, torch.frombuffer(bytearray(data), dtype=torch.uint8), None, None
        except DECODE_ERRORS as error:
            return 0, name, None, None, describe_error(error)
    decoded = _decode_one(preprocessing, name, data)[1]
    return (0, name, None, decoded, None) if isinstance(decoded, torch.Tensor) else (0, name, None, None, decoded)


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def decoded_batches(part: ImagePart, preprocessing: Any, device: torch.device, batch_size: int, threads: int,
                    device_decode: bool) -> Iterator[DecodedBatch]:  # fmt: skip
    """A part's images, decoded `batch_size` at a time: by PIL in `threads` threads (it releases the interpreter
    while it decodes), or, with `device_decode`, JPEGs by nvJPEG on the device in threads of their own streams and
    the rest by PIL. An image that cannot be read or decoded is an error of its own; the batch goes on."""
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode") as pool:
        if not device_decode:
            for chunk in _chunks(part.images(), batch_size):
                decoded = list(pool.map(lambda pair: _decode_one(preprocessing, *pair), chunk))
                ok = [(name, image) for name, image in decoded if isinstance(image, torch.Tensor)]
                size = preprocessing.image_size
                images = torch.stack([image for _, image in ok]) if ok else torch.empty(0, 3, size, size,
                                                                                         dtype=torch.uint8)  # fmt: skip
                yield DecodedBatch([name for name, _ in decoded], [name for name, _ in ok], images,
                                   {name: why for name, why in decoded if isinstance(why, str)})  # fmt: skip
            return

        def encoded(chunk: list) -> dict:
            items = [(position, *item[1:]) for position, item in
                     enumerate(pool.map(lambda pair: _for_the_device(preprocessing, *pair), chunk))]  # fmt: skip
            return collate_encoded(items)

        for batch in decoded_ahead(map(encoded, _chunks(part.images(), batch_size)), preprocessing, device,
                                   threads):  # fmt: skip
            names = batch["paths"]
            yield DecodedBatch(names, [names[p] for p in batch["ok"]], batch["images"],
                               {names[p]: why for p, why in batch["errors"].items()})  # fmt: skip


class PartWriter(Protocol):
    """Where one part's features go while it is extracted."""

    def write(self, names: list[str], features: np.ndarray, errors: dict[str, str]) -> None:
        """Features `(n, ...)` float16 of `names` (in the part's order), and the images that failed in the batch."""

    def finish(self) -> dict[str, Any]:
        """Make the part complete and done (atomically); returns what it records (counts, failures)."""


class FeatureSink(Protocol):
    """A store's side of extraction: which parts are done, a writer per part, and one set from all parts."""

    def done(self, part: ImagePart) -> bool:
        """Whether this part was extracted already (a resumed run skips it)."""

    def writer(self, part: ImagePart) -> PartWriter:
        """A writer for this part (anything a killed attempt at it left is discarded)."""

    def assemble(self, parts: Sequence[ImagePart]) -> None:
        """Rank 0, once every part is done: one complete set from the parts."""


def extract_parts(parts: Sequence[ImagePart], spec: FeatureSpec, sink: FeatureSink, device: torch.device | str = "cpu",
                  batch_size: int | None = None, threads: int = 4, device_decode: bool | None = None,
                  compile_encoder: bool = False, rank: int = 0, world_size: int = 1,
                  barrier: Callable[[], None] = lambda: None) -> None:  # fmt: skip
    """Extract every part not done yet (this rank's share: parts `rank`, `rank + world_size`, ...), then have rank 0
    assemble them. Every rank must call it (it waits for the others twice).

    Args:
        parts: The units of work, in the order of the set (`captioner.features.sources`).
        spec: The encoder and the kind of features.
        sink: The store's writer of parts.
        device: Where the encoder runs (its precision and decode path follow: `extraction_method`).
        batch_size: Images per encoder pass (None: 256 on a GPU, 8 on a CPU).
        threads: Images decoded at once (PIL), or batches decoded ahead on the device.
        device_decode: Decode JPEGs on the device (None: on a GPU).
        compile_encoder: Run the encoder through `torch.compile`.
        rank, world_size, barrier: This process among those sharing the work.
    """
    device = torch.device(device)
    decode, precision = extraction_method(device, device_decode)
    on_device = decode != "pil"
    batch_size = batch_size or default_batch_size(device)
    mine = [part for index, part in enumerate(parts) if index % world_size == rank]
    todo = [part for part in mine if not sink.done(part)]
    if todo:
        if len(todo) < len(mine):
            log.info("Resuming feature extraction: %d of this process's %d parts are done.", len(mine) - len(todo),
                     len(mine))  # fmt: skip
        encoder = spec.encoder
        encoder.load_pretrained()
        encoder = encoder.to(device).eval()
        compiled = torch.compile(encoder) if compile_encoder else encoder

        def forward(images: torch.Tensor) -> torch.Tensor:
            return compiled(images.to(device, non_blocking=True), grid=spec.grid)

        chunk = [batch_size]  # shrinks when the device runs out of memory
        total = sum(len(part.names) for part in todo) or None  # parts read from a shard index: not known yet
        with (
            # Extraction draws no random number of the run's: a run trains the same whether or not it extracted.
            torch.random.fork_rng(devices=[]),
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
            tqdm(total=total, unit="img", desc=f"{spec.encoder.name} features", dynamic_ncols=True,
                 disable=rank != 0) as bar,  # fmt: skip
        ):
            for part in todo:
                writer = sink.writer(part)
                for batch in decoded_batches(part, spec.preprocessing, device, batch_size, threads, on_device):
                    rows = np.zeros((0, *spec.row_shape()), dtype=np.float16)
                    if batch.ok:
                        rows = encode_in_chunks(forward, batch.images, chunk).float().cpu().numpy().astype(np.float16)
                    writer.write(batch.ok, rows, batch.errors)
                    bar.update(len(batch.names))
                writer.finish()
    barrier()
    if rank == 0:
        sink.assemble(parts)
    barrier()
