"""The memory-mapped feature cache: encoder features computed once into one fp16 array per image list, read row by
row on demand (or held whole in memory: `captioner.features.resident`).

Layout of one cache folder (named after its key, `captioner.features.keys`):

    features.npy     (N, D) pooled or (N, regions, D) grid float16
    index.json       the completion marker, written last: key, version, the encoder's spec, shape, file names, files
                     that could not be decoded (their rows are zeros)
    parts/           while extracting: one `<part>.npy` and `<part>.json` per finished part (removed once assembled)

A killed extraction resumes at the parts it had not finished. A complete cache
(one with its index) whose index or array do not check out is refused, naming
what differs and what to do; it is never used, deleted or rebuilt silently.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.core.errors import CaptionerError
from captioner.core.files import jsonable, read_json, write_json
from captioner.features.extraction import extract_parts
from captioner.features.keys import FEATURES_VERSION, FeatureSpec
from captioner.sources.parts import IMAGES_PER_FOLDER_PART, ImagePart, folder_parts

log = logging.getLogger(__name__)

FEATURES_FILE, PARTIAL_FILE, INDEX_FILE, PARTS_DIR = "features.npy", "features.partial.npy", "index.json", "parts"


@dataclass
class FeatureCache:
    """A complete, validated cache opened read-only.

    Attributes:
        directory: Its folder.
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


def _label(spec: dict[str, Any]) -> str:
    options = ", ".join(f"{k}={v!r}" for k, v in (spec.get("init_args") or {}).items() if k not in ("config",))
    return f"{spec.get('class_path', '?').rsplit('.', 1)[-1]}({options})"


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
    for name, value in {"version": FEATURES_VERSION, "key": key}.items():
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


def open_complete_cache(directory: Path, key: str, spec: FeatureSpec) -> FeatureCache:
    """The complete cache in `directory`, which must be the one this run expects: a folder with an index is never
    deleted or rebuilt behind the user's back.

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


def _new_array(path: Path, count: int, row_shape: tuple[int, ...]) -> np.ndarray:
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(count, *row_shape))
    reserve_disk_space(path)
    return array


class _CachePartWriter:
    """One part's rows in a memory-mapped file of its own, in the part's order; done once its record is written."""

    def __init__(self, folder: Path, part: ImagePart, key: str, row_shape: tuple[int, ...]) -> None:
        self.folder, self.part, self.key = folder, part, key
        self.row = {name: index for index, name in enumerate(part.names)}
        self.partial = folder / f"{part.name}.partial.npy"
        self.array = _new_array(self.partial, len(part.names), row_shape)
        self.failed: dict[str, str] = {}

    def write(self, names: list[str], features: np.ndarray, errors: dict[str, str]) -> None:
        if names:
            self.array[[self.row[name] for name in names]] = features
        self.failed.update(errors)

    def finish(self) -> dict[str, Any]:
        self.array.flush()  # the rows first, then the record that they are there
        del self.array
        self.partial.replace(self.folder / f"{self.part.name}.npy")
        record = {"key": self.key, "count": len(self.part.names), "failed": self.failed}
        write_json(self.folder / f"{self.part.name}.json", record)
        return record


class CacheSink:
    """Extraction's writer of the memory-mapped cache (see `captioner.features.extraction.FeatureSink`)."""

    def __init__(
        self,
        directory: Path,
        key: str,
        spec: FeatureSpec,
        file_names: list[str],
        images_dir: Any,
        require_some: bool = True,
    ) -> None:
        self.directory, self.key, self.spec, self.file_names = directory, key, spec, file_names
        self.images_dir, self.require_some = images_dir, require_some
        self.parts, self.folder = directory / PARTS_DIR, directory

    def done(self, part: ImagePart) -> bool:
        record = self.parts / f"{part.name}.json"
        if not record.is_file() or not (self.parts / f"{part.name}.npy").is_file():
            return False
        try:
            return read_json(record, "Feature part").get("key") == self.key
        except CaptionerError:
            return False

    def writer(self, part: ImagePart) -> _CachePartWriter:
        self.parts.mkdir(parents=True, exist_ok=True)
        for leftover in self.parts.glob(f"{part.name}.*"):  # what a killed attempt at it left
            leftover.unlink()
        return _CachePartWriter(self.parts, part, self.key, self.spec.row_shape())

    def assemble(self, parts: Sequence[ImagePart]) -> None:
        """The parts' rows into one array, in order, then the index that marks the cache complete.

        Raises:
            CaptionerError: When `require_some` and no image at all could be decoded (nothing is promoted).
        """
        failed: dict[str, str] = {}
        row_shape = self.spec.row_shape()
        array = _new_array(self.directory / PARTIAL_FILE, len(self.file_names), row_shape)
        start = 0
        for part in parts:
            rows = np.load(self.parts / f"{part.name}.npy", mmap_mode="r")
            array[start : start + len(rows)] = rows
            failed.update(read_json(self.parts / f"{part.name}.json", "Feature part")["failed"])
            start += len(rows)
        if start != len(self.file_names):
            raise CaptionerError(
                f"The feature parts in {self.parts} hold {start} rows for {len(self.file_names)} "
                "images; remove that folder and extract again."
            )
        array.flush()
        del array
        if self.require_some and len(failed) == len(self.file_names):
            raise CaptionerError(
                f"None of the {len(self.file_names)} images in {self.images_dir} could be decoded "
                f"(e.g. {next(iter(failed.items()))})."
            )
        (self.directory / PARTIAL_FILE).replace(self.directory / FEATURES_FILE)
        write_json(
            self.directory / INDEX_FILE,
            {
                "version": FEATURES_VERSION,
                "key": self.key,
                "encoder": self.spec.encoder_spec,
                "count": len(self.file_names),
                "shape": list(row_shape),
                "file_names": self.file_names,
                "failed": failed,
            },
        )
        shutil.rmtree(self.parts, ignore_errors=True)


def extract_cache(
    directory: str | Path,
    key: str,
    images_dir: str | Path,
    file_names: list[str],
    spec: FeatureSpec,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    threads: int = 4,
    device_decode: bool | None = None,
    compile_encoder: bool = False,
    per_part: int = IMAGES_PER_FOLDER_PART,
) -> FeatureCache:
    """Extract these images into a cache at `directory` under `key`, in this process alone (a decode path chosen
    by hand: the benchmark and the GPU tests compare them), and open it.

    Raises:
        CaptionerError: As `prepare_cache`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    extract_parts(
        folder_parts(file_names, Path(images_dir), per_part),
        spec,
        CacheSink(directory, key, spec, file_names, images_dir),
        device,
        batch_size,
        threads,
        device_decode,
        compile_encoder,
    )
    return open_cache(directory, key)


def prepare_cache(
    root: str | Path,
    images_dir: str | Path,
    file_names: list[str],
    spec: FeatureSpec,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    threads: int = 4,
    compile_encoder: bool = False,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    per_part: int = IMAGES_PER_FOLDER_PART,
) -> FeatureCache:
    """The cache of these images' features, extracted first where missing (every rank its share of the parts).

    Every rank of a distributed run calls it; the others wait while rank 0 assembles. A complete cache is opened
    without any of this.

    Args:
        root: Folder holding all caches (one subfolder per key).
        images_dir: Folder the file names are relative to.
        file_names: The images, in the row order of the cache.
        spec: The encoder and the kind of features.
        device, batch_size, threads, compile_encoder: As `captioner.features.extraction.extract_parts`.
        rank, world_size, barrier: This process among those sharing the work.
        per_part: Images per part (the unit of resuming and of sharing out).

    Raises:
        CaptionerError: When a complete cache there is refused, no image can be decoded, or the disk is full.
    """
    key = spec.key(file_names, device)
    directory = spec.directory(root, key)
    if (directory / INDEX_FILE).exists():
        return open_complete_cache(directory, key, spec)
    barrier()  # every rank has looked before any writes
    directory.mkdir(parents=True, exist_ok=True)
    sink = CacheSink(directory, key, spec, file_names, images_dir)
    try:
        extract_parts(
            folder_parts(file_names, Path(images_dir), per_part),
            spec,
            sink,
            device,
            batch_size,
            threads,
            compile_encoder=compile_encoder,
            rank=rank,
            world_size=world_size,
            barrier=barrier,
        )
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise CaptionerError(
            f"No space left on device while writing features into {directory}. Free disk space "
            "and rerun: extraction resumes at the parts it finished."
        ) from error
    return open_complete_cache(directory, key, spec)


def load_cache(
    root: str | Path, file_names: list[str], spec: FeatureSpec, device: torch.device | str = "cpu"
) -> FeatureCache:
    """Open an existing complete cache, as extracted on `device`, without computing anything.

    Raises:
        CaptionerError: When the cache is missing or invalid (run prepare first).
    """
    key = spec.key(file_names, device)
    return open_cache(spec.directory(root, key), key, spec.encoder_spec)
