"""CLIP cosines of captions with their images for the confidence's fourth feature (`captioner.decoding.confidence`),
computed where the model is trained and tested.

The images are read from their files as the captioner's encoder sees them (its
preprocessing), then brought to CLIP's input: the view `ClipReranker` has at
inference, where only the encoder's pixels are at hand, so the feature means
the same at fitting and at use. Image embeddings are kept by file, as validation
sees the same images every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.core.errors import CaptionerError
from captioner.evaluation.clip_rerank import caption_cosines
from captioner.evaluation.clip_score import ClipModel

log = logging.getLogger("captioner")


class ClipCosines:
    """Each caption's CLIP cosine with its image file (see the module docstring).

    Args:
        clip: The CLIP model.
        preprocessing: The captioner's encoder preprocessing (`captioner.encoders.preprocessing.Preprocessing`).
    """

    def __init__(self, clip: ClipModel, preprocessing: Any) -> None:
        self.clip, self.preprocessing = clip, preprocessing
        self.images: dict[str, np.ndarray] = {}

    @classmethod
    def load(cls, name: str, preprocessing: Any, device: str | torch.device) -> ClipCosines | None:
        """The CLIP `name` on `device`, or None (said once) when it cannot be loaded: training goes on without the
        CLIP feature."""
        try:
            return cls(ClipModel(name, device), preprocessing)
        except CaptionerError as error:
            log.warning("The confidence is calibrated without CLIP (%s could not be loaded: %s).", name, error)
            return None

    @property
    def name(self) -> str:
        return self.clip.name

    def __call__(self, files: Sequence[Path], captions: Sequence[str]) -> np.ndarray:
        """`(N,)` cosines of `captions[i]` with the image in `files[i]`."""
        missing = [path for path in dict.fromkeys(map(str, files)) if path not in self.images]
        if missing:
            pixels = torch.stack([self.preprocessing.from_file(path) for path in missing])
            self.images.update(zip(missing, self.clip.embed_pixels(pixels), strict=True))
        embeddings = np.stack([self.images[str(path)] for path in files]) if len(files) else np.zeros((0, 1))
        return caption_cosines(self.clip, embeddings, list(captions))
