"""The captions self-critical training draws from the model, with their gradients, under the same logits rules as
decoding (`captioner.decoding.rules`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captioner.decoding.rules import BanTokens, apply
from captioner.decoding.search import Decoded
from captioner.decoding.torch_ops import TorchOps
from captioner.models.decoders.base import CaptionDecoder
from captioner.models.objectives.base import SequenceSpec
from captioner.models.stepping import DecoderStepper


@dataclass
class CaptionSample:
    """Sampled captions with their per-token log-probabilities, which keep their graph (self-critical training).

    Attributes:
        tokens: `(B, T)` generated tokens without `<start>`; after `<end>` only `<pad>`.
        log_probs: `(B,)` each caption's total log-probability, `<end>` included.
        lengths: `(B,)` generated tokens, `<end>` included.
        token_log_probs: `(B, T)` the log-probability of each generated token (0 after the end).
    """

    tokens: torch.Tensor
    log_probs: torch.Tensor
    lengths: torch.Tensor
    token_log_probs: torch.Tensor | None = None

    @classmethod
    def best_of(cls, decoded: Decoded) -> CaptionSample:
        """The best caption of each image of a search's result."""
        return cls(decoded.best_tokens, decoded.best_scores, decoded.best_lengths)

    @property
    def mask(self) -> torch.Tensor:
        """`(B, T)` True for generated tokens, `<end>` included."""
        return torch.arange(self.tokens.shape[1], device=self.tokens.device) < self.lengths.unsqueeze(1)


def sample_captions(
    decoder: CaptionDecoder, features: torch.Tensor, sequences: SequenceSpec, samples: int = 1
) -> CaptionSample:
    """Draw `samples` captions per image from the model's distribution, keeping the graph (for policy gradients).

    Rows are image-major (image 0's samples first). The logits rules are the ones decoding applies
    (`sequences.rules`: never-generated tokens, and the model's decoding rules such as bad endings or no repeated
    n-grams), so training samples what inference may write; `log_probs` and `token_log_probs` are differentiable.
    """
    special, max_words = sequences.special, sequences.max_length
    stepper, ops = DecoderStepper(decoder, features), TorchOps(features.device)
    rules = sequences.rules if sequences.rules is not None else [BanTokens(special.banned)]
    rows = features.shape[0] * samples
    state = stepper.start(samples)
    previous = torch.full((rows,), special.start, dtype=torch.long, device=features.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=features.device)
    lengths = torch.zeros(rows, dtype=torch.long, device=features.device)
    steps, picked_log_probs = [], []
    words = torch.zeros(rows, 0, dtype=torch.long, device=features.device)
    for step in range(max_words + 1):
        logits, state = stepper.step(previous, state)
        log_probs = torch.log_softmax(apply(rules, logits.float(), words, step, ops), dim=-1)
        token = torch.multinomial(log_probs.detach().exp(), 1).squeeze(1)
        picked = log_probs.gather(1, token.unsqueeze(1)).squeeze(1)
        token = token.masked_fill(finished, special.pad)
        picked_log_probs.append(picked.masked_fill(finished, 0.0))
        lengths = lengths + (~finished).long()
        steps.append(token)
        words = torch.cat([words, token.unsqueeze(1)], dim=1)
        finished = finished | (token == special.end)
        previous = token
        if bool(finished.all()):  # no draws after the last caption ends: a seed gives the same samples as ever
            break
    width = max(int(lengths.max()), 1)
    tokens, token_log_probs = torch.stack(steps, dim=1)[:, :width], torch.stack(picked_log_probs, dim=1)[:, :width]
    return CaptionSample(tokens, token_log_probs.sum(dim=1), lengths, token_log_probs)
