"""The one extraction pipeline every feature store uses: image parts decoded by the one decode pipeline
(`captioner.core.pipeline`: threads, JPEGs with nvJPEG on a GPU, batches assembled ahead), encoded, and handed to
the store's writer a part at a time; parts done are skipped (resume), each rank of a
distributed run claims its next part when it finishes one (the job engine's claims, as bulk captioning's), and
rank 0 assembles them when all are done.

    parts ─> decoded batches ─> encoder (bf16 autocast where native; chunks halved on out-of-memory)
          ─> PartWriter.write(names, features, failures) ─> PartWriter.finish(part)  (atomic: the part is done)
    every rank claims its next part until none is left (captioner.jobs.claims), barrier,
    rank 0: FeatureSink.assemble(parts), barrier

A store supplies the `FeatureSink` (where parts go and how they become one set):
the memory-mapped cache (`captioner.features.cache`) and the streamed shards
(`captioner.features.streamed`).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from captioner.core.errors import CaptionerError
from captioner.core.pipeline import DecodedBatch, ImageInput, decoded_batches
from captioner.encoders.image_files import DEVICE_DECODE, TorchPixels
from captioner.features.keys import FeatureSpec, extraction_method
from captioner.jobs.claims import DEFAULT_LEASE_SECONDS, Claims, work_through
from captioner.sources.parts import ImagePart

log = logging.getLogger(__name__)


def default_batch_size(device: torch.device) -> int:
    """Images per encoder pass: large on a GPU; small on a CPU, where bigger batches only add cache misses."""
    return 256 if device.type == "cuda" else 8


def free_device_memory(device: torch.device) -> None:
    """Return the caching allocator's free blocks to the device (after the failed chunk's tensors are gone)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def encode_in_chunks(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, chunk: list[int]
) -> torch.Tensor:
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


def decoded_parts(part: ImagePart, pixels: TorchPixels, batch_size: int, threads: int) -> Iterator[DecodedBatch]:
    """A part's images decoded `batch_size` at a time through the one decode pipeline (`captioner.core.pipeline`):
    on the host in `threads` threads, JPEGs on the device with nvJPEG where `pixels` says so, the next batches
    decoding while the encoder works on this one. An image that cannot be read fails alone."""
    inputs = (ImageInput(name, data) for name, data in part.images())
    return decoded_batches(inputs, pixels, batch_size, threads)


class PartWriter(Protocol):
    """Where one part's features go while it is extracted."""

    def write(self, names: list[str], features: np.ndarray, errors: dict[str, str]) -> None:
        """Features `(n, ...)` float16 of `names` (in the part's order), and the images that failed in the batch."""

    def finish(self) -> dict[str, Any]:
        """Make the part complete and done (atomically); returns what it records (counts, failures)."""


class FeatureSink(Protocol):
    """A store's side of extraction: which parts are done, a writer per part, and one set from all parts.

    Attributes:
        folder: Where the set is built (the workers' claims are kept there while it is).
    """

    folder: Path

    def done(self, part: ImagePart) -> bool:
        """Whether this part was extracted already (a resumed run skips it)."""

    def writer(self, part: ImagePart) -> PartWriter:
        """A writer for this part (anything a killed attempt at it left is discarded)."""

    def assemble(self, parts: Sequence[ImagePart]) -> None:
        """Rank 0, once every part is done: one complete set from the parts."""


def extract_parts(
    parts: Sequence[ImagePart],
    spec: FeatureSpec,
    sink: FeatureSink,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    threads: int = 4,
    device_decode: bool | None = None,
    compile_encoder: bool = False,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> None:
    """Extract every part not done yet, each process claiming its next part when it finishes one (the job engine's
    claims, `captioner.jobs.claims`, in the store's folder: a slow rank never holds the others up), then have rank 0
    assemble them. Every rank must call it (it waits for the others three times).

    Args:
        parts: The units of work, in the order of the set (`captioner.sources.parts`).
        spec: The encoder and the kind of features.
        sink: The store's writer of parts.
        device: Where the encoder runs (its precision and decode path follow: `extraction_method`).
        batch_size: Images per encoder pass (None: 256 on a GPU, 8 on a CPU).
        threads: Images decoded at once (PIL), or batches decoded ahead on the device.
        device_decode: Decode JPEGs on the device (None: on a GPU).
        compile_encoder: Run the encoder through `torch.compile`.
        rank, world_size, barrier: This process among those sharing the work.
        lease_seconds: How long a claim lives without its process renewing it.
    """
    device = torch.device(device)
    decode, precision = extraction_method(device, device_decode)
    pixels = TorchPixels(spec.preprocessing, device, decode == DEVICE_DECODE)
    batch_size = batch_size or default_batch_size(device)
    claims = Claims(sink.folder, f"{socket.gethostname()}-rank{rank}-{os.getpid()}", lease_seconds)
    if rank == 0:
        claims.clear()  # every process extracting here is a rank of this run: older claims are a killed run's
    barrier()
    by_name = {part.name: part for part in parts}
    todo = [part for part in parts if not sink.done(part)]
    if todo and rank == 0 and len(todo) < len(parts):
        log.info("Resuming feature extraction: %d of %d parts are done.", len(parts) - len(todo), len(parts))
    forward, chunk = None, [batch_size]  # the chunk shrinks when the device runs out of memory
    total = sum(len(part.names) for part in todo) or None  # parts read from a shard index: not known yet
    with (
        # Extraction draws no random number of the run's: a run trains the same whether or not it extracted.
        torch.random.fork_rng(devices=[]),
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
        tqdm(
            total=total,
            unit="img",
            desc=f"{spec.encoder.name} features",
            dynamic_ncols=True,
            disable=rank != 0 or not todo,
        ) as bar,
    ):
        start = rank * len(parts) // max(1, world_size)
        for lease in work_through(claims, list(by_name), lambda name: sink.done(by_name[name]), start=start):
            part = by_name[lease.part]
            try:
                if forward is None:
                    forward = _encoder_forward(spec, device, compile_encoder)
                writer = sink.writer(part)
                for batch in decoded_parts(part, pixels, batch_size, threads):
                    rows = np.zeros((0, *spec.row_shape()), dtype=np.float16)
                    if batch.ok:
                        rows = encode_in_chunks(forward, batch.pixels, chunk).float().cpu().numpy().astype(np.float16)
                    writer.write(
                        [batch.names[i] for i in batch.ok],
                        rows,
                        {batch.names[i]: why for i, why in batch.errors.items()},
                    )
                    bar.update(len(batch.names))
                if lease.held():
                    writer.finish()
            finally:
                lease.release()
    barrier()
    if rank == 0:
        sink.assemble(parts)
        shutil.rmtree(claims.folder, ignore_errors=True)
    barrier()


def _encoder_forward(spec: FeatureSpec, device: torch.device, compile_encoder: bool) -> Callable:
    """The encoder with its pretrained weights on `device`, as a function of a batch of images."""
    encoder = spec.encoder
    encoder.load_pretrained()
    encoder = encoder.to(device).eval()
    compiled = torch.compile(encoder) if compile_encoder else encoder

    def forward(images: torch.Tensor) -> torch.Tensor:
        return compiled(images.to(device, non_blocking=True), grid=spec.grid)

    return forward
