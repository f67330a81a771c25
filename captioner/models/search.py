"""Batched greedy and beam search over a `CaptionDecoder`.

Both run every image (and every beam) of a batch in one decoder call per
step; no Python loop over images, beams or the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captioner.models.decoder import AttentionDecoder, CaptionDecoder


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids search needs: where to start, when to stop, what never to emit."""

    start: int
    end: int
    pad: int
    banned: tuple[int, ...]

    @classmethod
    def of(cls, vocabulary) -> SpecialTokens:
        """From a `Vocabulary`: `<pad>`, `<start>` and `<unk>` are never generated."""
        return cls(
            vocabulary.start_index,
            vocabulary.end_index,
            vocabulary.pad_index,
            (vocabulary.pad_index, vocabulary.start_index, vocabulary.unk_index),
        )


def _next_log_probs(decoder: CaptionDecoder | AttentionDecoder, previous: torch.Tensor, state, special: SpecialTokens):
    logits, state = decoder.step(previous, state)
    logits = logits.float()
    logits[:, list(special.banned)] = float("-inf")
    return torch.log_softmax(logits, dim=-1), state


@dataclass
class SearchResult:
    """Decoded captions for a batch.

    Attributes:
        tokens: `(B, T)` generated tokens without `<start>`; after `<end>` only `<pad>`.
        log_probs: `(B,)` the model's total log-probability of each sequence, `<end>` included.
        lengths: `(B,)` generated tokens, `<end>` included.
    """

    tokens: torch.Tensor
    log_probs: torch.Tensor
    lengths: torch.Tensor


def length_normalised(log_probs: torch.Tensor, lengths: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """GNMT length normalisation: `log_prob / ((5 + length) / 6) ** length_penalty`; 0 keeps raw scores."""
    if length_penalty == 0:
        return log_probs
    return log_probs / ((5.0 + lengths.to(log_probs.dtype)) / 6.0) ** length_penalty


@torch.no_grad()
def greedy_search(
    decoder: CaptionDecoder | AttentionDecoder, features: torch.Tensor, max_length: int, special: SpecialTokens
) -> SearchResult:
    """Pick the most likely next word at every step.

    Args:
        decoder: The trained decoder.
        features: `(B, feature_dim)` pooled or `(B, regions, feature_dim)` grid features, as the decoder reads.
        max_length: Most words per caption; a caption without `<end>` stops there.
        special: Start, end, padding and never-generated tokens.
    """
    return _unroll(decoder, features, max_length, special, pick=lambda log_probs: log_probs.argmax(dim=-1))


@torch.no_grad()
def beam_search(
    decoder: CaptionDecoder | AttentionDecoder,
    features: torch.Tensor,
    beam_size: int,
    max_length: int,
    special: SpecialTokens,
    length_penalty: float = 0.0,
) -> SearchResult:
    """Keep the `beam_size` best partial captions per image; return the best finished one.

    Beams are pruned on raw log-probability; the final choice among them uses
    the length penalty. The greedy caption is kept as one more candidate, so
    the result never scores below greedy decoding under the same criterion.

    Args:
        decoder: The trained decoder.
        features: `(B, feature_dim)` pooled or `(B, regions, feature_dim)` grid features, as the decoder reads.
        beam_size: Beams per image; 1 is greedy decoding.
        max_length: Most words per caption; beams without `<end>` stop there.
        special: Start, end, padding and never-generated tokens.
        length_penalty: GNMT alpha; > 0 favours longer captions, 0 ranks by raw log-probability.
    """
    greedy = greedy_search(decoder, features, max_length, special)
    if beam_size <= 1:
        return greedy
    batch, device = features.shape[0], features.device
    k = beam_size
    state = decoder.expand_state(decoder.init_state(features), k)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    previous = torch.full((batch * k,), special.start, dtype=torch.long, device=device)
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, k, dtype=torch.long, device=device)
    history = torch.empty(batch, k, 0, dtype=torch.long, device=device)
    batch_offsets = (torch.arange(batch, device=device) * k).unsqueeze(1)
    for _ in range(max_length + 1):
        step_log_probs, state = _next_log_probs(decoder, previous, state, special)
        step_log_probs = step_log_probs.view(batch, k, -1)
        # A finished beam may only continue with <pad>, at no cost, so it keeps its score.
        done_row = torch.full_like(step_log_probs[0, 0], float("-inf"))
        done_row[special.pad] = 0.0
        step_log_probs = torch.where(finished.unsqueeze(-1), done_row, step_log_probs)
        vocab = step_log_probs.shape[-1]
        candidates = (scores.unsqueeze(-1) + step_log_probs).view(batch, k * vocab)
        scores, flat = candidates.topk(k, dim=-1)
        beam, token = flat // vocab, flat % vocab
        history = torch.cat([history.gather(1, beam.unsqueeze(-1).expand_as(history)), token.unsqueeze(-1)], dim=-1)
        was_finished = finished.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~was_finished).long()
        finished = was_finished | (token == special.end)
        order = (beam + batch_offsets).view(-1)
        state = decoder.select_state(state, order)
        previous = token.view(-1)
        if bool(finished.all()):
            break
    ranked = length_normalised(scores, lengths, length_penalty)
    best = ranked.argmax(dim=-1)
    rows = torch.arange(batch, device=device)
    tokens, log_probs, best_lengths = history[rows, best], scores[rows, best], lengths[rows, best]
    # Prefer greedy where it scores higher (pruning can drop the greedy path).
    greedy_wins = length_normalised(greedy.log_probs, greedy.lengths, length_penalty) > ranked[rows, best]
    width = max(tokens.shape[1], greedy.tokens.shape[1])
    tokens = torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]), value=special.pad)
    greedy_tokens = torch.nn.functional.pad(greedy.tokens, (0, width - greedy.tokens.shape[1]), value=special.pad)
    return SearchResult(
        torch.where(greedy_wins.unsqueeze(-1), greedy_tokens, tokens),
        torch.where(greedy_wins, greedy.log_probs, log_probs),
        torch.where(greedy_wins, greedy.lengths, best_lengths),
    )


def sample_captions(
    decoder: CaptionDecoder | AttentionDecoder, features: torch.Tensor, max_length: int, special: SpecialTokens
) -> SearchResult:
    """Draw one caption per image from the model's distribution, keeping the graph.

    Used by self-critical training: `log_probs` is differentiable, so the
    policy gradient flows through it.
    """

    def draw(log_probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(log_probs.detach().exp(), 1).squeeze(1)

    return _unroll(decoder, features, max_length, special, pick=draw)


def _unroll(decoder, features: torch.Tensor, max_length: int, special: SpecialTokens, pick) -> SearchResult:
    """One caption per image, choosing each next token with `pick(log_probs) -> tokens`, until all end."""
    batch = features.shape[0]
    state = decoder.init_state(features)
    previous = torch.full((batch,), special.start, dtype=torch.long, device=features.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=features.device)
    log_probs = torch.zeros(batch, device=features.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=features.device)
    steps = []
    for _ in range(max_length + 1):
        step_log_probs, state = _next_log_probs(decoder, previous, state, special)
        token = pick(step_log_probs)
        picked = step_log_probs.gather(1, token.unsqueeze(1)).squeeze(1)
        token = token.masked_fill(finished, special.pad)
        log_probs = log_probs + picked.masked_fill(finished, 0.0)
        lengths = lengths + (~finished).long()
        steps.append(token)
        finished = finished | (token == special.end)
        previous = token
        if bool(finished.all()):
            break
    return SearchResult(torch.stack(steps, dim=1), log_probs, lengths)
