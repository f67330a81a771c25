"""Reranking a beam's alternatives by CLIPScore (LAION-COCO's recipe: decode several captions, keep the one CLIP
finds closest to the image).

The search returns each image's `num_beams` finished captions ranked by the
model's (length-normalised) log-probability; `ClipReranker` embeds every one
as CLIPScore does (`captioner.evaluation.clip_score`: "A photo depicts " +
caption) and reorders them by their cosine with the image, closest first (the
cosine, not CLIP-S `2.5 * max(cos, 0)`, which ties every caption a CLIP finds
unrelated at 0). With forced words, captions that hold them all stay ahead of
those that do not. The caption returned is the first after reranking; `score`
stays its log-probability, and every caption gains its `clip_score` (CLIP-S).

CLIP sees the image as the captioner's encoder was given it (its resize and
crop), resized to CLIP's input: for an encoder at CLIP's size and crop (224 px,
`resize: library` with a CLIP-like centre crop) that is CLIP's own
preprocessing; a squashed or smaller input is what CLIP then judges. One view
for every entry point (`caption`, `Captioner`, the server, the bulk job), which
all hold the encoder's pixels and not always the file.

Torch only: the exported runtime has no CLIP (`load_captioner` says so).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from captioner.decoding.search import Decoded
from captioner.evaluation.clip_score import PAPER_MODEL, PROMPT, WEIGHT, ClipModel


class ClipReranker:
    """Reorders each image's alternatives by CLIPScore (see the module docstring).

    Args:
        model: A `ClipModel`, or its name (`ViT-B-32:openai`, another OpenCLIP `name:tag`, a Hugging Face id or
            folder), loaded on `device`.
        device: Where CLIP runs when `model` is a name.
    """

    def __init__(self, model: ClipModel | str = PAPER_MODEL, device: str | torch.device = "cpu") -> None:
        self.clip = model if isinstance(model, ClipModel) else ClipModel(model, device)

    @property
    def name(self) -> str:
        return self.clip.name

    @staticmethod
    def clip_scores(cosines: np.ndarray) -> np.ndarray:
        """CLIP-S of the cosines `__call__` gave."""
        return clip_s(cosines)

    def __call__(self, pixels: torch.Tensor, decoded: Decoded, vocabulary: Any) -> tuple[Decoded, np.ndarray]:
        """The alternatives of each image reordered by their CLIP cosine with the image, and those cosines `(B, N)` in
        the new order (-inf for slots without a finished caption, which stay last; `clip_s` turns them to CLIP-S).

        Args:
            pixels: The `(B, 3, S, S)` uint8 images the captions were decoded from.
            decoded: The search's ranked captions (torch tensors).
            vocabulary: Turns token ids into text.
        """
        scores = decoded.scores.detach().cpu().numpy()
        finished = np.isfinite(scores)
        tokens = decoded.tokens.detach().cpu()
        texts = [
            text
            for image in range(len(scores))
            for text, done in zip(vocabulary.decode_batch(tokens[image]), finished[image])
            if done
        ]
        owners = np.repeat(np.arange(len(scores)), finished.sum(axis=1))
        cosine = np.full(scores.shape, -np.inf)
        cosine[finished] = caption_cosines(self.clip, self.clip.embed_pixels(pixels)[owners], texts)
        met = decoded.met.detach().cpu().numpy() if decoded.met is not None else np.ones(scores.shape, dtype=bool)
        # lexsort sorts by its last key first: finished captions, then those holding the forced words, then the
        # cosine; ties keep the model's own order (the slot's index).
        slots = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        order = np.stack([np.lexsort((slots[i], -cosine[i], ~met[i], ~finished[i])) for i in range(len(scores))])
        reordered = reorder(decoded, torch.as_tensor(order, device=decoded.scores.device))
        return reordered, np.take_along_axis(cosine, order, 1)


def clip_s(cosines: np.ndarray) -> np.ndarray:
    """CLIP-S (`2.5 * max(cos, 0)`) of cosines, -inf (no caption) kept."""
    cosines = np.asarray(cosines, dtype=np.float64)
    return np.where(np.isfinite(cosines), WEIGHT * np.maximum(cosines, 0.0), -np.inf)


def caption_cosines(clip: ClipModel, images: np.ndarray, captions: list[str]) -> np.ndarray:
    """Each caption's cosine with its image `(N,)`: `images` `(N, D)` normalised embeddings (`embed_pixels`), the
    captions embedded as CLIPScore embeds them."""
    texts, _ = clip.embed_texts([PROMPT + caption for caption in captions])
    return np.sum(images * texts, axis=1) if len(captions) else np.zeros(0)


def reorder(decoded: Decoded, order: torch.Tensor) -> Decoded:
    """`decoded` with each image's captions in `order` `(B, N)` (indices of the current slots)."""

    def take(array: torch.Tensor | None) -> torch.Tensor | None:
        if array is None:
            return None
        index = order.reshape(*order.shape, *([1] * (array.ndim - 2))).expand(*order.shape, *array.shape[2:])
        return torch.gather(array, 1, index)

    return dataclasses.replace(
        decoded,
        tokens=take(decoded.tokens),
        scores=take(decoded.scores),
        lengths=take(decoded.lengths),
        normalised=take(decoded.normalised),
        met=take(decoded.met),
    )
