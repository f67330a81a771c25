"""Encoder features computed once into a resumable, memory-mapped fp16 cache.

Layout of one cache folder (named after its key):

    features.npy        (N, D) float16, written in place while extracting as
                        features.partial.npy and renamed when complete
    progress.json       rows done so far (only while incomplete)
    index.json          the completion marker: key, version, shape, file names,
                        files that could not be decoded

The key covers the backbone, its weights, the preprocessing definition, the
decode path (PIL, or nvJPEG on a GPU), the encoder's precision and the image
list, so changing any of them computes a new cache. A cache whose index or array do
not check out is rebuilt with one warning, never used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from captioner.data.images import (
    CPU_DECODE,
    DEVICE_DECODE,
    EncodedFileDataset,
    ImageFileDataset,
    collate_encoded,
    collate_images,
    decoded_ahead,
)
from captioner.data.preprocessing import Preprocessing
from captioner.errors import CaptionerError
from captioner.files import read_json, write_json
from captioner.hardware import bf16_autocast_available
from captioner.models.encoder import ImageEncoder

log = logging.getLogger(__name__)

FEATURES_VERSION = 3
FEATURES_FILE, PARTIAL_FILE, INDEX_FILE, PROGRESS_FILE = (
    "features.npy",
    "features.partial.npy",
    "index.json",
    "progress.json",
)
SAVE_PROGRESS_EVERY_S = 20.0


def extraction_method(device: torch.device | str, device_decode: bool | None = None) -> tuple[str, str]:
    """How features are computed on `device`: the decode path and the encoder's precision.

    A GPU decodes JPEGs with nvJPEG (other files with PIL) and runs the encoder
    in bf16 autocast where bf16 is native; a CPU decodes with PIL and runs in fp32.
    Both are part of the cache key: a cache computed one way is never reused the other.
    """
    device = torch.device(device)
    decode = DEVICE_DECODE if (device.type == "cuda" if device_decode is None else device_decode) else CPU_DECODE
    precision = "bf16" if device.type == "cuda" and bf16_autocast_available(device) else "fp32"
    return decode, precision


def cache_key(
    backbone: str,
    weights: str | None,
    preprocessing: Preprocessing,
    file_names: list[str],
    grid: bool = False,
    decode: str = CPU_DECODE,
    precision: str = "fp32",
) -> str:
    """A digest of everything the cached features depend on."""
    spec = {"version": FEATURES_VERSION, "backbone": backbone, "weights": weights, "grid": grid,
            "preprocessing": preprocessing.to_dict(), "decode": decode, "precision": precision}  # fmt: skip
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for name in file_names:
        digest.update(name.encode() + b"\0")
    return digest.hexdigest()


def cache_dir_for(
    root: str | Path, backbone: str, weights: str | None, image_size: int, key: str, grid: bool = False
) -> Path:
    """The folder a cache with this key lives in; readable names help people clean up."""
    kind = "grid-" if grid else ""
    return Path(root) / f"{backbone}-{weights or 'random'}-{image_size}px-{kind}{key[:12]}"


@dataclass
class FeatureCache:
    """A complete, validated cache opened read-only.

    Attributes:
        features: `(N, D)` (pooled) or `(N, regions, D)` (grid) float16 memory map; rows are read on demand.
        file_names: Row order of `features`.
        failed: Files whose decoding failed, with the reason (their rows are zeros).
    """

    directory: Path
    features: np.ndarray
    file_names: list[str]
    failed: dict[str, str]

    @property
    def row_of(self) -> dict[str, int]:
        """Row index of every file name."""
        return {name: row for row, name in enumerate(self.file_names)}


def open_cache(directory: str | Path, key: str) -> FeatureCache:
    """Open and validate a complete cache.

    Raises:
        CaptionerError: When the index or the array is missing, truncated or does not match `key`.
    """
    directory = Path(directory)
    index = read_json(directory / INDEX_FILE, "Feature index")
    expected = {"version": FEATURES_VERSION, "key": key}
    for name, value in expected.items():
        if index.get(name) != value:
            raise CaptionerError(
                f"feature index {directory / INDEX_FILE} has {name}={index.get(name)!r}, expected {value!r}"
            )
    file_names, failed = index.get("file_names"), index.get("failed")
    count, shape = index.get("count"), tuple(index.get("shape") or ())
    if not isinstance(file_names, list) or len(file_names) != count or not isinstance(failed, dict):
        raise CaptionerError(
            f"feature index {directory / INDEX_FILE} is inconsistent (count {count}, names {len(file_names or [])})"
        )
    try:
        features = np.load(directory / FEATURES_FILE, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise CaptionerError(f"feature array {directory / FEATURES_FILE} cannot be read ({error})") from error
    if features.shape != (count, *shape) or features.dtype != np.float16:
        raise CaptionerError(
            f"feature array {directory / FEATURES_FILE} has shape {features.shape} {features.dtype}, "
            f"expected {(count, *shape)} float16"
        )
    return FeatureCache(directory, features, list(file_names), dict(failed))


def _resume_point(directory: Path, key: str, count: int, row_shape: tuple) -> tuple[int, dict[str, str]]:
    """Rows already done by an interrupted extraction with this key, and its failures so far."""
    progress_path, partial_path = directory / PROGRESS_FILE, directory / PARTIAL_FILE
    if not (progress_path.exists() and partial_path.exists()):
        return 0, {}
    try:
        progress = read_json(progress_path, "Extraction progress")
        partial = np.load(partial_path, mmap_mode="r")
        if progress.get("key") != key or partial.shape != (count, *row_shape) or partial.dtype != np.float16:
            raise CaptionerError("progress does not match")
        done = int(progress["done"])
        if not 0 <= done <= count:
            raise CaptionerError("progress out of range")
        return done, dict(progress.get("failed", {}))
    except (CaptionerError, OSError, ValueError, KeyError, TypeError):
        log.warning("Discarding an unreadable partial feature extraction in %s; starting over.", directory)
        return 0, {}


def _row_shape(encoder: ImageEncoder, image_size: int, grid: bool) -> tuple[int, ...]:
    """One image's feature shape: `(D,)` pooled, `(regions, D)` grid (from a forward pass on a blank image)."""
    if not grid:
        return (encoder.feature_dim,)
    with torch.inference_mode():
        blank = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)
        return tuple(encoder.cpu()(blank, grid=True).shape[1:])


def default_batch_size(device: torch.device) -> int:
    """Images per encoder pass: large on a GPU; small on a CPU, where bigger batches only add cache misses."""
    return 256 if device.type == "cuda" else 8


def _reserve_disk_space(path: Path) -> None:
    """Allocate the whole (sparse) array file now: a full disk then fails here with a clear error,
    not later with a bus error when a memory-mapped page cannot be written."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = path.stat().st_size
    try:
        with path.open("r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, size)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            path.unlink(missing_ok=True)
            raise CaptionerError(
                f"No space left on device for the feature cache {path} ({size / 2**20:.0f} MiB needed). "
                "Free space or move --data.work_dir to another disk, then rerun."
            ) from error
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate: carry on
            raise


def free_device_memory(device: torch.device) -> None:
    """Return the caching allocator's free blocks to the device (after the failed chunk's tensors are gone)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _encode_in_chunks(forward, images: torch.Tensor, chunk: list[int]) -> torch.Tensor:
    """Run the encoder over `images` in chunks of `chunk[0]`, halving it (for good) on out-of-memory."""
    while True:
        try:
            return torch.cat([forward(images[i : i + chunk[0]]) for i in range(0, len(images), chunk[0])])
        except torch.OutOfMemoryError:
            pass  # leave the except block first: its traceback holds the failed chunk's activations
        if chunk[0] == 1:
            raise CaptionerError(
                "The encoder runs out of device memory even on one image; use a smaller --data.image_size "
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
    encoder: ImageEncoder,
    preprocessing: Preprocessing,
    batch_size: int | None = None,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    device_decode: bool | None = None,
    compile_encoder: bool = False,
    require_some: bool = True,
    grid: bool = False,
) -> None:
    """Run `encoder` over the images into `directory`, resuming an interrupted run.

    With `grid`, each row is the encoder's last convolutional map as
    `(regions, feature_dim)` (for attention) instead of its average.

    Images follow `preprocessing` on every path. On a GPU (or with
    `device_decode=True`) JPEGs are read as bytes by the workers and decoded and
    resized in batches on the device; other files are decoded by the workers.
    Otherwise workers decode and resize. The encoder runs channels-last, in
    bf16 autocast on a GPU with native bf16 (see `extraction_method`), and
    optionally through `torch.compile`.

    Rows are written into a memory-mapped partial file; progress is saved at
    batch boundaries after the rows are flushed, so a run killed at any point
    resumes at a batch boundary and produces the same array as an
    uninterrupted run with the same batch size.

    Raises:
        CaptionerError: When no image at all can be decoded, or the disk is full.
    """
    directory, device = Path(directory), torch.device(device)
    batch_size = batch_size or default_batch_size(device)
    directory.mkdir(parents=True, exist_ok=True)
    count, row_shape = len(file_names), _row_shape(encoder, preprocessing.image_size, grid)
    done, failed = _resume_point(directory, key, count, row_shape)
    partial_path = directory / PARTIAL_FILE
    if done == 0:
        features = np.lib.format.open_memmap(partial_path, mode="w+", dtype=np.float16, shape=(count, *row_shape))
        _reserve_disk_space(partial_path)
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
    encoder = encoder.to(device)
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
            tqdm(
                total=count, initial=done, unit="img", desc=f"{encoder.backbone_name} features", dynamic_ncols=True
            ) as bar,
        ):
            for batch in decoded_ahead(loader, preprocessing, device) if device_decode else loader:
                start = done + batch["positions"][0]
                stop = done + batch["positions"][-1] + 1
                rows = np.zeros((stop - start, *row_shape), dtype=np.float16)
                if batch["ok"]:
                    images = batch["images"].to(device, non_blocking=True)
                    out = _encode_in_chunks(forward, images, chunk).float().cpu().numpy().astype(np.float16)
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
    _complete_cache(directory, key, file_names, row_shape, failed, images_dir, require_some)
    (directory / PROGRESS_FILE).unlink(missing_ok=True)


@dataclass(frozen=True)
class FeatureSpec:
    """What a cache's features depend on besides the image list and the device that computes them.

    Attributes:
        backbone, weights: The encoder (see `ImageEncoder`).
        preprocessing: How pixels reach the encoder.
        grid: Cache the last convolutional map as regions (for attention) instead of its average.
    """

    backbone: str
    weights: str | None
    preprocessing: Preprocessing
    grid: bool = False

    def key(self, file_names: list[str], device: torch.device | str = "cpu") -> str:
        """The cache key of these images when extracted on `device`."""
        decode, precision = extraction_method(device)
        return cache_key(self.backbone, self.weights, self.preprocessing, file_names, self.grid, decode, precision)

    def directory(self, root: str | Path, key: str) -> Path:
        return cache_dir_for(root, self.backbone, self.weights, self.preprocessing.image_size, key, self.grid)

    def encoder(self) -> ImageEncoder:
        mean, std = self.preprocessing.mean, self.preprocessing.std
        return ImageEncoder(self.backbone, self.weights, pretrained=True, mean=mean, std=std)


def prepare_features(
    root: str | Path,
    images_dir: str | Path,
    file_names: list[str],
    spec: FeatureSpec,
    batch_size: int | None = None,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    compile_encoder: bool = False,
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

    Returns:
        The validated, complete cache.
    """
    key = spec.key(file_names, device)
    directory = spec.directory(root, key)
    if (directory / INDEX_FILE).exists():
        try:
            return open_cache(directory, key)
        except CaptionerError as error:
            log.warning("Feature cache in %s is not usable (%s); rebuilding it.", directory, error)
            shutil.rmtree(directory)
    extract_features(directory, key, images_dir, file_names, spec.encoder(), spec.preprocessing, batch_size,
                     num_workers, device, compile_encoder=compile_encoder, grid=spec.grid)  # fmt: skip
    return open_cache(directory, key)


def load_features(
    root: str | Path, file_names: list[str], spec: FeatureSpec, device: torch.device | str = "cpu"
) -> FeatureCache:
    """Open an existing complete cache, as extracted on `device`, without computing anything (setup on every rank).

    Raises:
        CaptionerError: When the cache is missing or invalid (run prepare first).
    """
    key = spec.key(file_names, device)
    return open_cache(spec.directory(root, key), key)


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
    try:
        complete = open_cache(directory, key) if (directory / INDEX_FILE).exists() else None
    except CaptionerError as error:
        complete = None
        if rank == 0:
            log.warning("Feature cache in %s is not usable (%s); rebuilding it.", directory, error)
    barrier()  # every rank has decided before rank 0 may remove anything
    if complete is not None:
        return complete
    if rank == 0:
        for name in (INDEX_FILE, FEATURES_FILE):
            (directory / name).unlink(missing_ok=True)
    barrier()
    part_names = file_names[_shard(len(file_names), rank, world_size)]
    part = directory / "parts" / f"{world_size}-{rank}"
    if part_names and not (part / INDEX_FILE).exists():
        extract_features(part, spec.key(part_names, device), images_dir, part_names, spec.encoder(), spec.preprocessing,
                         batch_size, num_workers, device, compile_encoder=compile_encoder, require_some=False,
                         grid=spec.grid)  # fmt: skip
    barrier()
    if rank == 0:
        _assemble(directory, key, file_names, world_size, spec, images_dir, device)
    barrier()
    return open_cache(directory, key)


def _complete_cache(
    directory: Path, key: str, file_names: list[str], row_shape: tuple, failed: dict[str, str], images_dir,
    require_some: bool = True,
) -> None:  # fmt: skip
    """Promote the flushed partial array to the cache and write the index that marks it complete.

    Raises:
        CaptionerError: When `require_some` and no image at all could be decoded (nothing is promoted).
    """
    if require_some and len(failed) == len(file_names):
        raise CaptionerError(
            f"None of the {len(file_names)} images in {images_dir} could be decoded "
            f"(e.g. {next(iter(failed.items()))})."
        )
    (directory / PARTIAL_FILE).replace(directory / FEATURES_FILE)
    index = {"version": FEATURES_VERSION, "key": key, "count": len(file_names), "shape": list(row_shape),
             "file_names": file_names, "failed": failed}  # fmt: skip
    write_json(directory / INDEX_FILE, index)


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
            _reserve_disk_space(directory / PARTIAL_FILE)
        array[rows] = part.features
        failed.update(part.failed)
    row_shape = array.shape[1:]
    array.flush()
    del array
    _complete_cache(directory, key, file_names, row_shape, failed, images_dir)
    shutil.rmtree(directory / "parts", ignore_errors=True)
