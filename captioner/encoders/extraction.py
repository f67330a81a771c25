"""Feature extraction: running an encoder over image files into the feature store, resumable, alone or shared out
across the ranks of a distributed run."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from captioner.core.errors import CaptionerError
from captioner.core.files import jsonable, write_json
from captioner.encoders.base import ImageEncoder
from captioner.encoders.image_files import (
    DEVICE_DECODE,
    EncodedFileDataset,
    ImageFileDataset,
    collate_encoded,
    collate_images,
    decoded_ahead,
)
from captioner.encoders.store import (
    INDEX_FILE,
    PARTIAL_FILE,
    PROGRESS_FILE,
    FeatureCache,
    cache_dir_for,
    cache_key,
    complete_cache,
    extraction_method,
    open_cache,
    reserve_disk_space,
    resume_point,
)

log = logging.getLogger(__name__)

SAVE_PROGRESS_EVERY_S = 20.0


@dataclass(frozen=True, eq=False)
class FeatureSpec:
    """What a cache's features depend on besides the image list and the device that computes them.

    Attributes:
        encoder: The encoder (its spec and preprocessing are part of the key).
        grid: Cache the grid of regions (for decoders that attend) instead of the pooled vector.
    """

    encoder: ImageEncoder
    grid: bool = False

    @property
    def encoder_spec(self) -> dict[str, Any]:
        return jsonable(self.encoder.spec())

    def key(self, file_names: list[str], device: torch.device | str = "cpu") -> str:
        """The cache key of these images when extracted on `device`."""
        decode, precision = extraction_method(device)
        return cache_key(self.encoder_spec, self.encoder.preprocessing, file_names, self.grid, decode, precision)

    def directory(self, root: str | Path, key: str) -> Path:
        return cache_dir_for(root, self.encoder.name, self.encoder.preprocessing.image_size, key, self.grid)

    def row_shape(self) -> tuple[int, ...]:
        """One image's feature shape: `(D,)` pooled, `(regions, D)` grid."""
        if not self.grid:
            return (self.encoder.feature_dim,)
        rows, columns = self.encoder.grid_shape
        return (rows * columns, self.encoder.feature_dim)


def default_batch_size(device: torch.device) -> int:
    """Images per encoder pass: large on a GPU; small on a CPU, where bigger batches only add cache misses."""
    return 256 if device.type == "cuda" else 8


def free_device_memory(device: torch.device) -> None:
    """Return the caching allocator's free blocks to the device (after the failed chunk's tensors are gone)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def encode_in_chunks(forward, images: torch.Tensor, chunk: list[int]) -> torch.Tensor:
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


def extract_features(
    directory: str | Path,
    key: str,
    images_dir: str | Path,
    file_names: list[str],
    spec: FeatureSpec,
    batch_size: int | None = None,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    device_decode: bool | None = None,
    compile_encoder: bool = False,
    require_some: bool = True,
    decode_threads: int = 2,
) -> None:
    """Run the spec's encoder over the images into `directory`, resuming an interrupted run.

    Images follow the encoder's preprocessing on every path. On a GPU (or with
    `device_decode=True`) JPEGs are read as bytes by the workers and decoded and
    resized in batches on the device; other files are decoded by the workers.
    Otherwise workers decode and resize. The encoder runs in bf16 autocast on a
    GPU with native bf16 (see `extraction_method`), and optionally through
    `torch.compile`.

    Rows are written into a memory-mapped partial file; progress is saved at
    batch boundaries after the rows are flushed, so a run killed at any point
    resumes at a batch boundary and produces the same array as an
    uninterrupted run with the same batch size. On the device path,
    `decode_threads` batches are decoded ahead, each thread on its own stream.

    Raises:
        CaptionerError: When no image at all can be decoded, or the disk is full.
    """
    directory, device = Path(directory), torch.device(device)
    encoder, preprocessing, grid = spec.encoder, spec.encoder.preprocessing, spec.grid
    batch_size = batch_size or default_batch_size(device)
    directory.mkdir(parents=True, exist_ok=True)
    count, row_shape = len(file_names), spec.row_shape()
    done, failed = resume_point(directory, key, count, row_shape)
    partial_path = directory / PARTIAL_FILE
    if done == 0:
        features = np.lib.format.open_memmap(partial_path, mode="w+", dtype=np.float16, shape=(count, *row_shape))
        reserve_disk_space(partial_path)
    else:
        log.info("Resuming feature extraction at image %d of %d.", done, count)
        features = np.load(partial_path, mmap_mode="r+")

    def save_progress(array: np.ndarray, rows_done: int) -> None:
        array.flush()  # rows first, then the record that they are there
        write_json(directory / PROGRESS_FILE, {"key": key, "done": rows_done, "failed": failed})

    paths = [Path(images_dir) / name for name in file_names[done:]]
    decode, precision = extraction_method(device, device_decode)
    device_decode = decode == DEVICE_DECODE
    dataset = (EncodedFileDataset if device_decode else ImageFileDataset)(paths, preprocessing)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_encoded if device_decode else collate_images,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    encoder.load_pretrained()
    encoder = encoder.to(device).eval()
    compiled = torch.compile(encoder) if compile_encoder else encoder

    def forward(images: torch.Tensor) -> torch.Tensor:
        return compiled(images, grid=grid)

    chunk = [batch_size]  # shrinks when the device runs out of memory
    last_save, completed = time.monotonic(), done
    try:
        with (
            # The loader draws seeds from the global RNG: fork it, so a run trains the same model
            # whether or not the cache had to be built first.
            torch.random.fork_rng(devices=[]),
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
            tqdm(total=count, initial=done, unit="img", desc=f"{encoder.name} features", dynamic_ncols=True) as bar,
        ):
            for batch in decoded_ahead(loader, preprocessing, device, decode_threads) if device_decode else loader:
                start = done + batch["positions"][0]
                stop = done + batch["positions"][-1] + 1
                rows = np.zeros((stop - start, *row_shape), dtype=np.float16)
                if batch["ok"]:
                    images = batch["images"].to(device, non_blocking=True)
                    out = encode_in_chunks(forward, images, chunk).float().cpu().numpy().astype(np.float16)
                    rows[[position + done - start for position in batch["ok"]]] = out
                for position, reason in batch["errors"].items():
                    failed[file_names[done + position]] = reason
                features[start:stop] = rows
                bar.update(stop - start)
                completed = stop
                if time.monotonic() - last_save > SAVE_PROGRESS_EVERY_S:
                    save_progress(features, completed)
                    last_save = time.monotonic()
    except KeyboardInterrupt:
        save_progress(features, completed)  # Ctrl-C keeps every finished batch; SIGKILL keeps the last save
        raise
    except OSError as error:
        raise CaptionerError(
            f"Writing features to {partial_path} failed ({error}). Free disk space and rerun: extraction resumes."
        ) from error
    features.flush()
    del features
    complete_cache(directory, key, file_names, row_shape, failed, images_dir, spec.encoder_spec, require_some)
    (directory / PROGRESS_FILE).unlink(missing_ok=True)


def prepare_features(
    root: str | Path,
    images_dir: str | Path,
    file_names: list[str],
    spec: FeatureSpec,
    batch_size: int | None = None,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    compile_encoder: bool = False,
    decode_threads: int = 2,
) -> FeatureCache:
    """Open the cache for these images and encoder, computing or resuming it first if needed.

    Args:
        root: Folder holding all caches (one subfolder per key).
        images_dir: Folder the file names are relative to.
        file_names: The images, in the row order of the cache.
        spec: The encoder and the kind of features.
        batch_size: Images per forward pass (None: 256 on a GPU, 8 on a CPU).
        num_workers: DataLoader workers decoding images.
        device: Where the encoder runs.
        compile_encoder: Run the encoder through `torch.compile` (pays off on large sets on a GPU).
        decode_threads: Batches of JPEGs decoded ahead on a GPU, each thread on its own stream.

    Returns:
        The validated, complete cache.
    """
    key = spec.key(file_names, device)
    directory = spec.directory(root, key)
    if (directory / INDEX_FILE).exists():
        return open_complete_cache(directory, key, spec)
    extract_features(directory, key, images_dir, file_names, spec, batch_size, num_workers, device,
                     compile_encoder=compile_encoder, decode_threads=decode_threads)  # fmt: skip
    return open_cache(directory, key, spec.encoder_spec)


def open_complete_cache(directory: Path, key: str, spec: FeatureSpec) -> FeatureCache:
    """The complete cache in `directory`, which must be the one this run expects: a folder with an index is never
    deleted or rebuilt behind the user's back (only an unfinished extraction is, when it cannot be resumed).

    Raises:
        CaptionerError: Saying why the cache is refused and what to do.
    """
    try:
        return open_cache(directory, key, spec.encoder_spec)
    except CaptionerError as error:
        raise CaptionerError(
            f"The feature cache in {directory} is complete but not the one this run expects: {error}. Nothing was "
            "deleted. Remove that folder to extract the features again, or point --data.work_dir elsewhere."
        ) from None


def load_features(
    root: str | Path, file_names: list[str], spec: FeatureSpec, device: torch.device | str = "cpu"
) -> FeatureCache:
    """Open an existing complete cache, as extracted on `device`, without computing anything (setup on every rank).

    Raises:
        CaptionerError: When the cache is missing or invalid (run prepare first).
    """
    key = spec.key(file_names, device)
    return open_cache(spec.directory(root, key), key, spec.encoder_spec)


def _shard(count: int, rank: int, world_size: int) -> slice:
    return slice(rank * count // world_size, (rank + 1) * count // world_size)


def prepare_features_sharded(
    root: str | Path,
    images_dir: str | Path,
    file_names: list[str],
    spec: FeatureSpec,
    rank: int,
    world_size: int,
    barrier,
    batch_size: int | None = None,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    compile_encoder: bool = False,
    decode_threads: int = 2,
) -> FeatureCache:
    """Build the cache with every rank of a distributed run extracting its own share.

    Rank r extracts the contiguous rows `[r*N/W, (r+1)*N/W)` into a part cache
    of its own (`parts/W-r/`, resumable like any cache), so no two processes
    write the same file. After a barrier, rank 0 copies the parts into the
    one cache, in row order, and writes its index; after a second barrier
    every rank opens it. A complete cache is opened without any of this.

    Args:
        rank: This process's global rank.
        world_size: Number of processes.
        barrier: A callable that blocks until every rank reaches it.
        Others: as `prepare_features`.
    """
    key = spec.key(file_names, device)
    directory = spec.directory(root, key)
    complete = open_complete_cache(directory, key, spec) if (directory / INDEX_FILE).exists() else None
    barrier()  # every rank has looked before any starts writing parts
    if complete is not None:
        return complete
    part_names = file_names[_shard(len(file_names), rank, world_size)]
    part = directory / "parts" / f"{world_size}-{rank}"
    if part_names and not (part / INDEX_FILE).exists():
        extract_features(part, spec.key(part_names, device), images_dir, part_names, spec, batch_size, num_workers,
                         device, compile_encoder=compile_encoder, require_some=False,
                         decode_threads=decode_threads)  # fmt: skip
    barrier()
    if rank == 0:
        _assemble(directory, key, file_names, world_size, spec, images_dir, device)
    barrier()
    return open_cache(directory, key, spec.encoder_spec)


def _assemble(
    directory: Path, key: str, file_names: list[str], world_size: int, spec: FeatureSpec, images_dir, device
) -> None:
    """Copy the ranks' part caches into the one cache, in row order, and write its index."""
    count, failed, array = len(file_names), {}, None
    for rank in range(world_size):
        rows = _shard(count, rank, world_size)
        part_names = file_names[rows]
        if not part_names:
            continue
        part = open_cache(directory / "parts" / f"{world_size}-{rank}", spec.key(part_names, device))
        if array is None:
            shape = (count, *part.features.shape[1:])
            array = np.lib.format.open_memmap(directory / PARTIAL_FILE, mode="w+", dtype=np.float16, shape=shape)
            reserve_disk_space(directory / PARTIAL_FILE)
        array[rows] = part.features
        failed.update(part.failed)
    row_shape = array.shape[1:]
    array.flush()
    del array
    complete_cache(directory, key, file_names, row_shape, failed, images_dir, spec.encoder_spec)
    shutil.rmtree(directory / "parts", ignore_errors=True)
