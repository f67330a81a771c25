"""Cross-entropy with teacher forcing, optionally label-smoothed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from captioner.models.decoders.base import CaptionDecoder
from captioner.models.objectives.base import Objective, ObjectiveOutput, SequenceSpec


def caption_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, pad_index: int, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy over the non-padding target tokens, computed in float32.

    Args:
        logits: `(B, T, V)` decoder output.
        targets: `(B, T)` next tokens; `pad_index` positions do not count.
        pad_index: The padding token.
        label_smoothing: Share of the target's probability spread over the vocabulary.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=pad_index,
        label_smoothing=label_smoothing,
    )


class CrossEntropy(Objective):
    """Predict each caption token from the previous ones (teacher forcing), plus the decoder's own regulariser.

    Args:
        label_smoothing: Spread this share of each target's probability over the vocabulary (0: none; 0.1 is
            common for Transformers).
        per_image: Train on images, each item with all its captions, instead of on single captions: decoders
            then do their per-image work once for all of an image's captions (for the Transformer, projecting the
            regions and the cross-attention keys: 1.7 times the training speed on a CPU). Batches then hold
            fewer distinct images: on the demo scenes the pooled LSTM trained this way reached a test CIDEr of
            256 against 295 (same number of epochs).
    """

    def __init__(self, label_smoothing: float = 0.0, per_image: bool = False) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing, self.per_image = label_smoothing, per_image

    @property
    def train_items(self) -> str:
        return "images" if self.per_image else "captions"

    def __call__(
        self, decoder: CaptionDecoder, features: torch.Tensor, batch: dict, sequences: SequenceSpec
    ) -> ObjectiveOutput:
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        output = decoder(features, inputs, owners=batch["owners"])  # per-image work once for all its captions
        loss = caption_cross_entropy(output.logits, targets, sequences.special.pad, self.label_smoothing)
        loss = loss + decoder.regularization(output, targets != sequences.special.pad)
        return ObjectiveOutput(loss, batch_size=len(tokens))
