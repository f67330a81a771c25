"""Torch datasets over a feature store's rows (`captioner.features.rows`: the memory-mapped cache, a resident
table, or the images for an encoder that trains): captions, or images with all their captions.

Features are read row by row from the cache on demand (never all loaded);
captions are kept as one padded int tensor. Whole batches are fetched at once
through `__getitems__`, so a batch is one fancy-indexed read.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from captioner.features.rows import FeatureRows, PixelRows, Reader, RowIndex
from captioner.text.words import normalize

__all__ = ["FeatureRows", "ImageCaptions", "PixelRows", "Reader", "RowIndex", "TrainCaptions", "passthrough"]

log = logging.getLogger(__name__)


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
    across ranks). For a model of several caption styles (`captioner.text.styles`),
    `tokens` are every caption as the model learns it (its style's marker first), the
    references those of the default style, and `style_references` each style's, as
    written (None for an image without a caption of that style).
    """

    def __init__(
        self,
        reader: Reader,
        rows: np.ndarray,
        file_names: list[str],
        captions: list[tuple[str, ...]],
        vocabulary: Any,
        image_ids: list[int | str] | None = None,
        texts: list[tuple[str, ...]] | None = None,
        style_references: dict[str, list[tuple[str, ...]]] | None = None,
    ) -> None:
        texts = captions if texts is None else texts
        self.features = reader
        self.augmented = reader.augmented
        self.rows, self.file_names = rows, file_names
        self.image_ids = list(image_ids) if image_ids is not None else list(file_names)
        self.raw_references = [list(image_captions) for image_captions in captions]
        self.references = [[" ".join(normalize(c)) for c in image_captions] for image_captions in captions]
        self.style_references = {
            style: [list(image_captions) or None for image_captions in references]
            for style, references in (style_references or {}).items()
        }
        counts = torch.tensor([len(c) for c in texts])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.tokens = vocabulary.encode_batch([c for image_texts in texts for c in image_texts])
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
            "style_references": {
                style: [references[i] for i in indices] for style, references in self.style_references.items()
            },
        }

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])


def passthrough(batch):
    """Collate function for datasets that build whole batches in `__getitems__`."""
    return batch
