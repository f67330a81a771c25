"""The decoder protocol: what every caption decoder provides, and all that search and training rely on.

A decoder is an `nn.Module` subclass of `CaptionDecoder`, built from two sizes
the data decides (the vocabulary size and the image feature size) plus its
own options, which it records with `self.save_hyperparameters()`:

    class MyDecoder(CaptionDecoder):
        features = "grid"                      # or "pooled": what the feature cache holds for it

        def __init__(self, vocab_size: int, feature_dim: int, hidden_dim: int = 512, dropout: float = 0.3):
            super().__init__()
            self.save_hyperparameters()        # recorded in checkpoints, compared when one is loaded
            ...

        def forward(self, features, tokens, return_attention=False, owners=None) -> DecoderOutput: ...  # teaching
        def prepare(self, features) -> Context: ...                 # per-image constants, computed once
        def initial_state(self, context) -> State: ...              # per-caption state before the first word
        def step(self, tokens, state, context) -> tuple[Tensor, State]: ...   # one word for every caption
        def longest_caption(self) -> int | None: ...        # optional: the most words it can write (positions)
        def export_mode(self): ...                          # optional: a context for ONNX export
        def load_pretrained(self) -> None: ...              # optional: weights fetched at the start of training
        def parameter_groups(self, lr) -> list[dict]: ...   # optional: learning rates per parameter group

Conventions that let one search serve every decoder:

- Every tensor in a context or a state has the batch on dimension 0.
  Contexts and states are tuples (or nested tuples, lists, dicts) of tensors.
- `expand` repeats every row of a state `beams` times (row i becomes rows
  i*beams ... (i+1)*beams-1); `reorder` keeps the rows at an index. The
  defaults do that for any tensor tree.
- Beam search and sampling call `expand_context` once and never reorder the
  context: the beams of one image share its constants (region features,
  cross-attention keys). By default it repeats rows like `expand`; a decoder
  may instead keep one context row per image and, in `step`, let each context
  row serve `rows // context_rows` consecutive state rows (the beams or samples
  of one image), which reads each image's constants once per step instead of
  once per beam (the attention and Transformer decoders do).
- `forward` may get `owners`, the image row of each caption, when an image's
  captions share one feature row: do the per-image work once, then index.
- `step` with the state after the words `w_1..w_t` must give the logits
  `forward` gives at position t for the same words (tested for every decoder).

Choose a decoder in the config by `class_path` (any importable class,
including one outside this package):

    model:
      decoder:
        class_path: my_package.decoders.MyDecoder
        init_args: {hidden_dim: 256}
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.core.mixins import HyperparametersMixin
from torch import nn

from captioner.core.errors import CaptionerError
from captioner.core.parts import class_path, config_class, import_trusted_class

Context = Any  # a tensor tree, batch on dimension 0 (per-image constants)
State = Any  # a tensor tree, batch on dimension 0 (per-caption state)
# The two sizes that come from the data: vocabulary size, image feature size.
SIZE_ARGUMENTS = ("vocab_size", "feature_dim")


@dataclass
class DecoderOutput:
    """Teacher-forced output.

    Attributes:
        logits: `(B, T, vocab)` next-token logits at every position.
        attention: `(B, T, regions)` where each word looked in the image, for decoders that attend (else None);
            filled when asked for (`return_attention`) or when the decoder computes it anyway.
    """

    logits: torch.Tensor
    attention: torch.Tensor | None = None


def rows_per_context(rows: int, context_rows: int) -> int:
    """How many consecutive state rows each context row serves (1 when the context was repeated)."""
    if rows % context_rows:
        raise ValueError(f"{rows} state rows cannot share {context_rows} context rows")
    return rows // context_rows


def map_tensors(function: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    """Apply `function` to every tensor of a nested tuple, list or dict, keeping its structure."""
    if isinstance(tree, torch.Tensor):
        return function(tree)
    if isinstance(tree, dict):
        return {key: map_tensors(function, value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tensors(function, value) for value in tree)
    return tree


class CaptionDecoder(nn.Module, HyperparametersMixin):
    """Base class and written protocol of caption decoders (see the module docstring).

    Attributes:
        features: "pooled" (one `(B, D)` vector per image) or "grid" (`(B, regions, D)` from the last
            convolutional map): which features the cache must hold. A decoder reading "grid" may also be
            given pooled features, read as one region.
        training_only_options: Init arguments that may differ between a checkpoint and the config using it.
    """

    features: ClassVar[Literal["pooled", "grid"]] = "pooled"
    # Options that change training but not what the weights mean: a checkpoint may be used with other values.
    training_only_options: ClassVar[tuple[str, ...]] = ("dropout",)

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        return_attention: bool = False,
        owners: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Teacher-forced logits for `(R, T)` input tokens (starting with `<start>`).

        Args:
            features: `(R, ...)` image features, or `(B, ...)` with `owners`.
            tokens: `(R, T)` input tokens.
            return_attention: Also return where each word looked, for decoders that attend.
            owners: `(R,)` the row of `features` each caption belongs to (None: row i for caption i).
        """
        raise NotImplementedError

    def prepare(self, features: torch.Tensor) -> Context:
        """Per-image constants for step-by-step decoding (computed once per search)."""
        raise NotImplementedError

    def initial_state(self, context: Context) -> State:
        """The state before the first word."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: State, context: Context) -> tuple[torch.Tensor, State]:
        """`(B,)` previous tokens -> `(B, vocab)` logits of the next one, and the new state."""
        raise NotImplementedError

    def longest_caption(self) -> int | None:
        """The most words this decoder can write step by step (`step` is called once more, for `<end>`), or None
        when nothing in it bounds a caption's length. A decoder with a position table or a context window says so,
        and decoding settings asking for longer captions are refused before it runs."""
        return None

    @contextlib.contextmanager
    def export_mode(self) -> Iterator[None]:
        """While ONNX export traces this decoder: switch to what the exporter can convert (nothing by default; a
        language model uses its plain attention, not a fused kernel the exporter cannot convert)."""
        yield

    def load_pretrained(self) -> None:
        """Load pretrained weights (a language model's) at the start of a fresh training run; nothing by default.
        Checkpoints replace them, so captioning from a checkpoint needs no network."""

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (by default every trainable parameter at the model's `lr`)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def regularization(self, output: DecoderOutput, mask: torch.Tensor) -> torch.Tensor | float:
        """A term added to the training loss (0 by default); `mask` is True where the target is a real token."""
        return 0.0

    def expand(self, tree: Any, beams: int) -> Any:
        """Repeat every row `beams` times (a state, for beams or samples)."""
        return map_tensors(lambda tensor: tensor.repeat_interleave(beams, dim=0), tree)

    def expand_context(self, context: Context, beams: int) -> Context:
        """The context for `beams` state rows per image; by default repeated like a state (see the protocol)."""
        return self.expand(context, beams)

    def reorder(self, state: State, index: torch.Tensor) -> State:
        """Keep the state rows at `index` (the surviving beams)."""
        return map_tensors(lambda tensor: tensor.index_select(0, index), state)

    # ------------------------------------------------------------ identity
    def spec(self) -> dict[str, Any]:
        """What rebuilds this decoder: its class path and options (without the sizes the data decides)."""
        if not hasattr(self, "_hparams"):
            raise CaptionerError(
                f"{type(self).__qualname__} did not record its options: call self.save_hyperparameters() in its "
                "__init__ (see captioner/models/decoders/base.py)."
            )
        init_args = {key: value for key, value in self.hparams.items() if key not in SIZE_ARGUMENTS}
        return {"class_path": class_path(type(self)), "init_args": init_args}


def decoder_factory(spec: dict[str, Any], source: str = "the checkpoint") -> Callable[[int, int], CaptionDecoder]:
    """A callable `(vocab_size, feature_dim) -> decoder` from a `CaptionDecoder.spec()` (as checkpoints hold it).

    Raises:
        CaptionerError: When its class is not captioner's own nor in an allowed module (see
            `captioner.core.parts.import_trusted_class`), or cannot be imported.
    """
    cls = import_trusted_class(spec["class_path"], CaptionDecoder, "decoder", source)
    init_args = dict(spec.get("init_args") or {})
    return lambda vocab_size, feature_dim: cls(vocab_size, feature_dim, **init_args)


def decoder_features(decoder: Any) -> str:
    """Which features a configured decoder reads ("pooled" or "grid"), from its class; for config links.

    Args:
        decoder: A decoder class, a `functools.partial` of one, or a config value (`class_path` string,
            dict or namespace with `class_path`).
    """
    return getattr(config_class(decoder, CaptionDecoder, "decoder"), "features", "pooled")
