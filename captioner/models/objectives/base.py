"""The training objective protocol: the loss of one training batch, given the decoder.

An objective is a plain object chosen in the config by `class_path`:

    model:
      objective:
        class_path: captioner.models.objectives.CrossEntropy
        init_args: {label_smoothing: 0.1}

It declares what one training item is (`train_items`: "captions", one item
per caption with its tokens; or "images", one per image with all its
references, which the config link passes on to `data.train_items`), whether it
is a second stage that must start from trained weights
(`needs_initial_weights`), and computes the loss with `__call__`. It never
logs or writes files: it returns the loss and the figures to log, and the
LightningModule does the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from captioner.models.decoders.base import CaptionDecoder
from captioner.models.search import SpecialTokens


@dataclass(frozen=True)
class Decoding:
    """What an objective needs to decode: the special tokens and the longest caption."""

    special: SpecialTokens
    max_length: int


@dataclass
class ObjectiveOutput:
    """A batch's loss and what to log with it (names without the `train/` prefix)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)
    batch_size: int = 1


class Objective:
    """Base class of training objectives (see the module docstring)."""

    train_items: ClassVar[Literal["captions", "images"]] = "captions"
    needs_initial_weights: ClassVar[bool] = False

    def prepare(self, references: Sequence[Sequence[Sequence[int]]] | None, special: SpecialTokens) -> None:
        """Called once at the start of fit with every training image's references as word ids (None when the
        training items are captions)."""

    def __call__(
        self, decoder: CaptionDecoder, features: torch.Tensor, batch: Any, decoding: Decoding
    ) -> ObjectiveOutput:
        raise NotImplementedError


def train_items_of(objective: Any) -> str:
    """What one training item is for a configured objective (a class, instance or config value); for config links."""
    from captioner.models.decoders.base import import_class

    cls = objective
    if objective is None:
        return "captions"
    if isinstance(objective, str):
        cls = import_class(objective, Objective, "objective")
    elif isinstance(objective, dict) or hasattr(objective, "class_path"):
        path = objective["class_path"] if isinstance(objective, dict) else objective.class_path
        cls = import_class(path, Objective, "objective")
    return getattr(cls, "train_items", "captions")
