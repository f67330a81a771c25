"""Torch datasets over the memory-mapped feature cache (or the images, for an encoder that trains): captions, or
images with all their captions.

Features are read row by row from the cache on demand (never all loaded);
captions are kept as one padded int tensor. Whole batches are fetched at once
through `__getitems__`, so a batch is one fancy-indexed read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from captioner.core.pixels import DECODE_ERRORS, describe_error
from captioner.encoders.preprocessing import Preprocessing
from captioner.text.words import normalize

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
                log.warning("%s cannot be decoded (%s); training on a black image in its place.", path,
                            describe_error(error))  # fmt: skip
            size = self.preprocessing.image_size
            return torch.zeros(3, size, size, dtype=torch.uint8)

    def read(self, rows: np.ndarray, epochs: np.ndarray | None = None) -> torch.Tensor:
        epochs = np.zeros(len(rows), dtype=np.int64) if epochs is None else epochs
        return torch.stack([self._one(int(row), int(epoch)) for row, epoch in zip(rows, epochs)])


Reader = FeatureRows | PixelRows | RowIndex


def _indices(items: list) -> tuple[np.ndarray, np.ndarray | None]:
    """Dataset positions, and epochs when the sampler tags them (`ResumableSampler(tag_epoch=True)`)."""
    if items and isinstance(items[0], tuple):
        return np.asarray([i for _, i in items]), np.asarray([e for e, _ in items])
    return np.asarray(items), None


def _trim(tokens: torch.Tensor, pad_index: int) -> torch.Tensor:
    """Drop padding columns that no row of the batch uses (done on the CPU side, no device sync)."""
    used = int((tokens != pad_index).sum(dim=1).max()) if len(tokens) else 1
    return tokens[:, :used]


class TrainCaptions(Dataset):
    """Every (image, caption) pair of the training split, one item each (cross-entropy's default).

    A batch is a dict like `ImageCaptions`': `features` `(B, ...)` one row per
    caption, `tokens` `(B, L)`, `owners` (`arange(B)`: each caption its own row).

    Args:
        features_path: The cache's `features.npy`.
        rows: `(N,)` cache row of each caption's image.
        tokens: `(N, L)` encoded captions, `<start>` ... `<end>` then `<pad>`.
        pad_index: The padding token.
    """

    def __init__(self, reader: Reader, rows: np.ndarray, tokens: torch.Tensor, pad_index: int) -> None:
        self.features = reader
        self.rows, self.tokens, self.pad_index = rows, tokens, pad_index
        self.augmented = reader.augmented

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list) -> dict:
        index, epochs = _indices(indices)
        return {
            self.features.key: self.features.read(self.rows[index], epochs),
            "tokens": _trim(self.tokens[index], self.pad_index),
            "owners": torch.arange(len(index)),
        }

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])


class ImageCaptions(Dataset):
    """One item per image with all its reference captions (validation, test, and training for objectives that
    score whole images or ask for it).

    Decoders do their per-image work (projecting region features,
    cross-attention keys) once for all of an image's captions (`owners`).

    A batch is a dict: `features` `(B, D)`, `tokens` `(R, L)` for every
    reference of the batch, `owners` `(R,)` the batch row each reference
    belongs to, `references` (normalised like the vocabulary, for BLEU during
    training), `raw_references` (as written, for the COCO caption evaluation,
    which tokenises them itself), `file_names`, `image_ids` (the source's ids,
    else the file names) and `index` (dataset positions, to count each image once
    across ranks).
    """

    def __init__(
        self,
        reader: Reader,
        rows: np.ndarray,
        file_names: list[str],
        captions: list[tuple[str, ...]],
        vocabulary: Any,
        image_ids: list[int | str] | None = None,
    ) -> None:
        self.features = reader
        self.augmented = reader.augmented
        self.rows, self.file_names = rows, file_names
        self.image_ids = list(image_ids) if image_ids is not None else list(file_names)
        self.raw_references = [list(image_captions) for image_captions in captions]
        self.references = [[" ".join(normalize(c)) for c in image_captions] for image_captions in captions]
        counts = torch.tensor([len(c) for c in captions])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.tokens = vocabulary.encode_batch([c for image_captions in captions for c in image_captions])
        self.pad_index = vocabulary.pad_index
        # The words of every reference, as ids: CIDEr-D (self-critical rewards, val/cider) scores these.
        self.reference_ids = [[vocabulary.reference_words(c) for c in image_captions] for image_captions in captions]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list) -> dict:
        index, epochs = _indices(indices)
        indices = index.tolist()
        spans = [torch.arange(self.offsets[i], self.offsets[i + 1]) for i in indices]
        owners = torch.cat([torch.full((len(span),), row) for row, span in enumerate(spans)])
        return {
            self.features.key: self.features.read(self.rows[index], epochs),
            "tokens": _trim(self.tokens[torch.cat(spans)], self.pad_index),
            "owners": owners,
            "references": [self.references[i] for i in indices],
            "raw_references": [self.raw_references[i] for i in indices],
            "file_names": [self.file_names[i] for i in indices],
            "image_ids": [self.image_ids[i] for i in indices],
            "index": torch.as_tensor(index),
        }

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])


def passthrough(batch):
    """Collate function for datasets that build whole batches in `__getitems__`."""
    return batch
