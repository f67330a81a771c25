"""The feature store: encoder features computed once into a resumable, memory-mapped fp16 cache.

Layout of one cache folder (named after its key):

    features.npy        (N, D) pooled or (N, regions, D) grid float16, written in
                        place while extracting as features.partial.npy and renamed
                        when complete
    progress.json       rows done so far (only while incomplete)
    index.json          the completion marker: key, version, the encoder's spec,
                        shape, file names, files that could not be decoded

The key covers the encoder's spec (class and options), its preprocessing
definition, pooled or grid, the decode path (PIL, or nvJPEG on a GPU), the
encoder's precision and the image list, so changing any of them computes a new
cache. A complete cache (one with its index) whose index or array do not
check out is refused, naming what differs and what to do; it is never used,
deleted or rebuilt silently. Only an unfinished extraction that cannot be
resumed is started over, with one warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.core.errors import CaptionerError
from captioner.core.files import jsonable, read_json, write_json
from captioner.core.hardware import bf16_autocast_available
from captioner.encoders.image_files import CPU_DECODE, DEVICE_DECODE
from captioner.encoders.preprocessing import Preprocessing

log = logging.getLogger(__name__)

FEATURES_VERSION = 4
FEATURES_FILE, PARTIAL_FILE, INDEX_FILE, PROGRESS_FILE = (
    "features.npy",
    "features.partial.npy",
    "index.json",
    "progress.json",
)


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
    encoder: dict[str, Any],
    preprocessing: Preprocessing,
    file_names: list[str],
    grid: bool = False,
    decode: str = CPU_DECODE,
    precision: str = "fp32",
) -> str:
    """A digest of everything the cached features depend on (`encoder` is `ImageEncoder.spec()`)."""
    spec = {"version": FEATURES_VERSION, "encoder": encoder, "grid": grid, "preprocessing": preprocessing.to_dict(),
            "decode": decode, "precision": precision}  # fmt: skip
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for name in file_names:
        digest.update(name.encode() + b"\0")
    return digest.hexdigest()


def cache_dir_for(root: str | Path, encoder_name: str, image_size: int, key: str, grid: bool = False) -> Path:
    """The folder a cache with this key lives in; readable names help people clean up."""
    kind = "grid-" if grid else ""
    return Path(root) / f"{encoder_name}-{image_size}px-{kind}{key[:12]}"


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


def open_cache(directory: str | Path, key: str, encoder: dict[str, Any] | None = None) -> FeatureCache:
    """Open and validate a complete cache.

    Args:
        directory: The cache folder.
        key: The key it must have been made with.
        encoder: The spec of the encoder it must have been made by (checked first, for a clear message).

    Raises:
        CaptionerError: When the index or the array is missing, truncated, made by another encoder, or does not
            match `key`.
    """
    directory = Path(directory)
    index = read_json(directory / INDEX_FILE, "Feature index")
    made_by = index.get("encoder")
    if encoder is not None and made_by is not None and made_by != jsonable(encoder):
        raise CaptionerError(
            f"The feature cache in {directory} was made by the encoder {_label(made_by)}, not by the configured "
            f"{_label(encoder)}: features of one encoder are never read as another's. Remove the folder or point "
            "--data.work_dir elsewhere."
        )
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


def resume_point(directory: Path, key: str, count: int, row_shape: tuple) -> tuple[int, dict[str, str]]:
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


def reserve_disk_space(path: Path) -> None:
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


def _label(spec: dict[str, Any]) -> str:
    options = ", ".join(f"{k}={v!r}" for k, v in (spec.get("init_args") or {}).items() if k not in ("config",))
    return f"{spec.get('class_path', '?').rsplit('.', 1)[-1]}({options})"


def complete_cache(
    directory: Path, key: str, file_names: list[str], row_shape: tuple, failed: dict[str, str], images_dir,
    encoder: dict[str, Any], require_some: bool = True,
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
    index = {"version": FEATURES_VERSION, "key": key, "encoder": encoder, "count": len(file_names),
             "shape": list(row_shape), "file_names": file_names, "failed": failed}  # fmt: skip
    write_json(directory / INDEX_FILE, index)


class ResidentFeatures:
    """A complete cache held whole in memory, on the training device or in pinned host memory, where batches are
    gathered by row: no loader worker copies features, batch after batch.

    Args:
        features: The cache's `(N, ...)` float16 array (read once).
        device: Where the rows are gathered (the training device).
        host: Keep the table in (pinned, on a GPU machine) host memory and copy each gathered batch to `device`,
            for a table over the device's budget.
    """

    def __init__(self, features: np.ndarray, device: torch.device | str, host: bool = False) -> None:
        self.device = torch.device(device)
        table = torch.from_numpy(np.array(features, dtype=np.float16, copy=True))  # read whole, into memory
        if host:
            self.table = table.pin_memory() if self.device.type == "cuda" else table
        else:
            self.table = table.to(self.device)

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows' features as float32 on the training device."""
        picked = self.table[rows.to(self.table.device)]
        return picked.to(self.device, non_blocking=True).float()


def memory_budget(device: torch.device | str) -> int:
    """Bytes a resident feature table may take by default: half of the device's free memory on a GPU, a quarter of
    the memory the host has available otherwise (what is left for the model, its activations and the loaders)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: be modest
        available = 4 * 2**30
    return available // 4


def host_budget() -> int:
    """A quarter of the host's available memory (for a table kept in pinned host memory beside a GPU)."""
    return memory_budget("cpu")
