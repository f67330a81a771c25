"""How a feature store's rows are read for a batch: from the memory-mapped cache (`FeatureRows`), by row index
from a table held in memory (`RowIndex`), or as the images themselves for an encoder that trains (`PixelRows`).
The datasets (`captioner.data.datasets`) read through them whatever the store."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from captioner.core.pixels import DECODE_ERRORS, describe_error
from captioner.encoders.preprocessing import Preprocessing

log = logging.getLogger(__name__)


class FeatureRows:
    """Rows of the feature cache; opened lazily in each process (a memmap must not be pickled to workers)."""

    key = "features"
    augmented = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_array": None}

    def read(self, rows: np.ndarray, epochs: np.ndarray | None = None) -> torch.Tensor:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        order = np.argsort(rows, kind="stable")  # sorted reads are sequential on disk
        out = np.empty((len(rows), *self._array.shape[1:]), dtype=np.float16)
        out[order] = self._array[rows[order]]
        return torch.from_numpy(out).float()


class RowIndex:
    """The rows themselves: the batch carries `rows`, and the datamodule gathers their features from a table held
    in memory (`captioner.features.resident.ResidentFeatures`) once the batch is on the training device."""

    key = "rows"
    augmented = False

    def read(self, rows: np.ndarray, epochs: np.ndarray | None = None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(rows))


class PixelRows:
    """Images instead of cached features, for an encoder that trains: row r is `paths[r]`, decoded and preprocessed.

    With `augment` (below 1: the least share of each side its random crop keeps), each image gets the encoder's
    training transform, drawn from a generator seeded by the run's
    seed, the epoch and the row: the same crops whatever the loader workers and however often the run resumed.
    An image that cannot be decoded comes back black, with one warning per file.
    """

    key = "images"

    def __init__(self, paths: list[Path], preprocessing: Preprocessing, augment: float = 1.0, seed: int = 0) -> None:
        self.paths, self.preprocessing, self.min_side, self.seed = list(paths), preprocessing, augment, seed
        self.augmented = augment < 1.0
        self._warned: set[int] = set()

    def _one(self, row: int, epoch: int) -> torch.Tensor:
        path = self.paths[row]
        try:
            if not self.augmented:
                return self.preprocessing.from_file(path)
            generator = torch.Generator().manual_seed(hash((self.seed, epoch, row)) & (2**63 - 1))
            return self.preprocessing.augmented_file(path, generator, self.min_side)
        except DECODE_ERRORS as error:
            if row not in self._warned:
                self._warned.add(row)
                log.warning(
                    "%s cannot be decoded (%s); training on a black image in its place.", path, describe_error(error)
                )
            size = self.preprocessing.image_size
            return torch.zeros(3, size, size, dtype=torch.uint8)

    def read(self, rows: np.ndarray, epochs: np.ndarray | None = None) -> torch.Tensor:
        epochs = np.zeros(len(rows), dtype=np.int64) if epochs is None else epochs
        return torch.stack([self._one(int(row), int(epoch)) for row, epoch in zip(rows, epochs)])


Reader = FeatureRows | PixelRows | RowIndex
