"""The training objective protocol: the loss of one training batch, given the decoder.

An objective is a plain object chosen in the config by `class_path`:

    model:
      objective:
        class_path: captioner.models.objectives.CrossEntropy
        init_args: {label_smoothing: 0.1}

An objective says what one training item is (`train_items`): "captions", one
item per caption (a batch's `features` then have one row per caption), or
"images", one item per image with all its references (one `features` row per
image, and `index`, each image's position in the training set). Either way a
batch holds `features`, `tokens` (one row per caption, `<start>` ... `<end>`
then `<pad>`) and `owners` (the `features` row of each caption); the config
link passes `train_items` on to `data.needs.train_items`. It also declares whether it
is a second stage that must start from trained weights
(`needs_initial_weights`), may look at the training references once
(`prepare`; `needs_references` when it cannot train without them, as streamed
sets do not hold them), and computes the loss with `__call__`. It never logs or writes
files: it returns the loss and the figures to log, and the LightningModule does
the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from captioner.core.errors import CaptionerError
from captioner.core.parts import config_class, config_init_args
from captioner.decoding.config import SpecialTokens
from captioner.models.decoders.base import CaptionDecoder


@dataclass(frozen=True)
class SequenceSpec:
    """What an objective needs to know of captions: the special tokens, the most words a caption has, and the logits
    rules decoding applies (None: only the never-generated tokens are banned), for objectives that sample."""

    special: SpecialTokens
    max_length: int
    rules: list[Any] | None = None


@dataclass
class ObjectiveOutput:
    """A batch's loss and what to log with it (names without the `train/` prefix)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)
    batch_size: int = 1


class Objective:
    """Base class of training objectives (see the module docstring)."""

    needs_initial_weights: ClassVar[bool] = False
    # Whether `prepare` needs every training image's references (a streamed training set does not hold them).
    needs_references: ClassVar[bool] = False

    @property
    def train_items(self) -> Literal["captions", "images"]:
        """What one training item is: "captions" or "images" (each with all its references)."""
        return "captions"

    def prepare(self, references: Sequence[Sequence[Sequence[int]]], special: SpecialTokens) -> None:
        """Called once at the start of fit with every training image's references as word ids."""

    def start(
        self, references: list | None, train_items: str, special: SpecialTokens, has_initial_weights: bool
    ) -> None:
        """At the start of fit: check the run can train this objective, then `prepare` it with the training set.

        Args:
            references: The training images' reference word ids (`CaptionData.references("train")`; None when the
                training set does not hold them).
            train_items: What a training item is ("captions" or "images").
            special: The special tokens.
            has_initial_weights: Whether training starts from trained weights.

        Raises:
            CaptionerError: A second stage without starting weights, or whole-image training without image items.
        """
        name = type(self).__name__
        if self.needs_initial_weights and not has_initial_weights:
            raise CaptionerError(
                f"{name} is a second training stage: start it from a cross-entropy model with "
                "--model.init_checkpoint path/to/best.ckpt."
            )
        if self.train_items == "images" and train_items != "images":
            raise CaptionerError(
                f"{name} trains on whole images: set --data.needs.train_items images (the config link "
                "does this from --model.objective)."
            )
        if self.needs_references and references is None:
            raise CaptionerError(
                f"{name} scores whole images against their references, which a streamed training "
                "set does not hold: run it on a cached set (--data.feature_store.kind cache), e.g. to "
                "fine-tune on COCO after pre-training on shards."
            )
        self.prepare(references or [], special)

    def __call__(
        self, decoder: CaptionDecoder, features: torch.Tensor, batch: Any, sequences: SequenceSpec
    ) -> ObjectiveOutput:
        raise NotImplementedError


def train_items_of(objective: Any) -> str:
    """What one training item is for a configured objective (an instance, or a config value with `class_path` and
    `init_args`); for the config link to `data.needs.train_items`."""
    if objective is None:
        return "captions"
    if isinstance(objective, Objective):
        return objective.train_items
    return config_class(objective, Objective, "objective")(**config_init_args(objective)).train_items
