"""A `CaptionDecoder` as the step function of the one search (`captioner.decoding.search.decode`), on tensors of the
decoder's device, with the step optionally compiled (`compiled_step`; batches padded to a few sizes).

`decode_with` decodes a batch of features with a decoder: the search the exported runtime also runs, over its graphs.
"""

from __future__ import annotations

from typing import Any

import torch

from captioner.decoding.config import DecodingConfig, SpecialTokens
from captioner.decoding.search import Decoded, decode
from captioner.decoding.torch_ops import TorchOps
from captioner.models.decoders.base import CaptionDecoder, Context, State, map_tensors

__all__ = ["Decoded", "DecoderStepper", "SpecialTokens", "compiled_step", "decode_with", "padded_rows"]


class DecoderStepper:
    """A decoder and a batch of image features as the step function search runs (see `captioner.decoding.search`).

    The images' constants are prepared once; for several rows per image (beams) the context is expanded once and
    only the state is reordered.
    """

    def __init__(self, decoder: CaptionDecoder, features: torch.Tensor, compiled: bool = False) -> None:
        self.decoder, self.features = decoder, features
        self.context: Context = None
        self._step = compiled_step(decoder) if compiled else decoder.step
        self._graphs = compiled and features.is_cuda

    def start(self, copies: int) -> State:
        context = self.decoder.prepare(self.features)
        state = self.decoder.initial_state(context)
        if copies > 1:
            state = self.decoder.expand(state, copies)
            context = self.decoder.expand_context(context, copies)  # once: an image's rows share its constants
        self.context = context
        return state

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if not self._graphs:
            return self._step(tokens, state, self.context)
        # CUDA graphs replay into the same memory: copy out what the search keeps past the next step.
        torch.compiler.cudagraph_mark_step_begin()
        logits, state = self._step(tokens, state, self.context)
        return logits.clone(), map_tensors(torch.clone, state)

    def reorder(self, state: State, rows: torch.Tensor) -> State:
        return self.decoder.reorder(state, rows)


def compiled_step(decoder: CaptionDecoder):
    """The decoder's `step` through `torch.compile`, made once per decoder: on a GPU with CUDA graphs
    ("reduce-overhead": a step's twenty-odd kernels launched as one graph), elsewhere with inductor's fused code.
    Shapes that change (a batch's size, the Transformer's growing cache) are compiled for once each and reused."""
    compiled = decoder.__dict__.get("_compiled_step")
    if compiled is None:
        cuda = next(decoder.parameters()).is_cuda
        compiled = torch.compile(decoder.step, mode="reduce-overhead" if cuda else "default", dynamic=None)
        decoder.__dict__["_compiled_step"] = compiled  # beside the module's attributes: not a submodule or state
    return compiled


def padded_rows(rows: int) -> int:
    """The batch size a compiled search runs at: the next power of two (at least 8), so that a handful of compiled
    shapes serve every batch."""
    return max(8, 1 << (rows - 1).bit_length())


@torch.no_grad()
def decode_with(
    decoder: CaptionDecoder,
    features: torch.Tensor,
    config: DecodingConfig,
    special: SpecialTokens,
    max_words: int,
    vocabulary: Any = None,
    compiled: bool = False,
    places: list[int] | None = None,
) -> Decoded:
    """Captions for a batch of features, as `config` says (ranked per image; see `captioner.decoding.search`).

    Args:
        decoder: The trained decoder.
        features: `(B, feature_dim)` pooled or `(B, regions, feature_dim)` grid features, as the decoder reads.
        config: Beams, rules, sampling.
        special: Start, end, padding and never-generated tokens.
        max_words: Most words per caption.
        vocabulary: The tokenizer (rules that name words: `bad_endings`, `prefix`, `bad_words`, `force_words`).
        compiled: Step through `compiled_step`, the batch padded to `padded_rows` (the padding rows' captions are
            dropped).
        places: Each image's place, which seeds its sampling stream (None: its row).
    """
    batch = features.shape[0]
    places = list(range(batch)) if places is None else list(places)
    if compiled and padded_rows(batch) != batch:
        padding = features[:1].expand(padded_rows(batch) - batch, *features.shape[1:])
        decoded = decode_with(
            decoder,
            torch.cat([features, padding]),
            config,
            special,
            max_words,
            vocabulary,
            compiled,
            places + [-1] * (padded_rows(batch) - batch),
        )
        return Decoded(
            decoded.tokens[:batch],
            decoded.scores[:batch],
            decoded.lengths[:batch],
            decoded.normalised[:batch],
            None if decoded.met is None else decoded.met[:batch],
        )
    stepper = DecoderStepper(decoder, features, compiled)
    return decode(stepper, batch, config, special, TorchOps(features.device), max_words, vocabulary, places)
