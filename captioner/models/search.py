"""Batched greedy search, beam search and sampling over any `CaptionDecoder`, through its protocol alone.

Every image (and every beam or sample) of a batch advances in one decoder
call per step; no Python loop over images, beams or the vocabulary. The
per-image context is prepared once and, for beams and samples, expanded once;
only the per-caption state is reordered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from captioner.models.decoders.base import CaptionDecoder, Context, State


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


@dataclass
class SearchResult:
    """Decoded captions for a batch.

    Attributes:
        tokens: `(B, T)` generated tokens without `<start>`; after `<end>` only `<pad>`.
        log_probs: `(B,)` the model's total log-probability of each sequence, `<end>` included.
        lengths: `(B,)` generated tokens, `<end>` included.
        token_log_probs: `(B, T)` the log-probability of each generated token (0 after the end); sampling keeps
            its graph for policy gradients. None for beam search.
    """

    tokens: torch.Tensor
    log_probs: torch.Tensor
    lengths: torch.Tensor
    token_log_probs: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """`(B, T)` True for generated tokens, `<end>` included."""
        return torch.arange(self.tokens.shape[1], device=self.tokens.device) < self.lengths.unsqueeze(1)


# Checking whether every caption has ended makes the host wait for the device; on a GPU,
# doing it every step leaves the device idle while the next step is launched. Steps taken
# after the last caption ended only add padding, which `_trimmed` removes.
CHECK_FINISHED_EVERY = 4


def _first_step(decoder: CaptionDecoder, previous: torch.Tensor, state: State, context: Context,
                 special: SpecialTokens) -> tuple[torch.Tensor, torch.Tensor, State]:  # fmt: skip
    """The first step's logits and state, and a `(V,)` boolean mask of the never-generated tokens on their device.

    Built once per search: indexing with a Python list every step would copy the
    indices to the device, and wait for it, at each step.
    """
    logits, state = decoder.step(previous, state, context)
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[list(special.banned)] = True
    return logits, banned, state


def _log_probs(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float().masked_fill(banned, float("-inf")), dim=-1)


def _all_finished(finished: torch.Tensor, step: int, last_step: int, every: int = CHECK_FINISHED_EVERY) -> bool:
    return step == last_step or (step % every == every - 1 and bool(finished.all()))


def _trimmed(tokens: torch.Tensor, lengths: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the trailing columns that only padding reached (steps run after every caption ended)."""
    width = max(int(lengths.max()), 1) if lengths.numel() else tokens.shape[-1]
    return tuple(tensor[..., :width] for tensor in (tokens, *others))


def length_normalised(log_probs: torch.Tensor, lengths: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """GNMT length normalisation: `log_prob / ((5 + length) / 6) ** length_penalty`; 0 keeps raw scores.

    With `length_penalty` > 0 a longer caption's (more negative) total is divided
    by more, so longer captions are favoured over short ones of similar per-word
    probability.
    """
    if length_penalty == 0:
        return log_probs
    return log_probs / ((5.0 + lengths.to(log_probs.dtype)) / 6.0) ** length_penalty


def _unroll(
    decoder: CaptionDecoder, context: Context, state: State, batch: int, max_length: int, special: SpecialTokens,
    pick: Callable[[torch.Tensor], torch.Tensor], device: torch.device, check_every: int = CHECK_FINISHED_EVERY,
) -> SearchResult:  # fmt: skip
    """One caption per row of `state`, choosing each next token with `pick(log_probs) -> tokens`, until all end."""
    previous = torch.full((batch,), special.start, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    steps, picked_log_probs = [], []
    logits, banned, state = _first_step(decoder, previous, state, context, special)
    for step in range(max_length + 1):
        if step:
            logits, state = decoder.step(previous, state, context)
        step_log_probs = _log_probs(logits, banned)
        token = pick(step_log_probs)
        picked = step_log_probs.gather(1, token.unsqueeze(1)).squeeze(1)
        token = token.masked_fill(finished, special.pad)
        picked_log_probs.append(picked.masked_fill(finished, 0.0))
        lengths = lengths + (~finished).long()
        steps.append(token)
        finished = finished | (token == special.end)
        previous = token
        if _all_finished(finished, step, max_length, check_every):
            break
    tokens, token_log_probs = _trimmed(torch.stack(steps, dim=1), lengths, torch.stack(picked_log_probs, dim=1))
    return SearchResult(tokens, token_log_probs.sum(dim=1), lengths, token_log_probs)


@torch.no_grad()
def greedy_search(decoder: CaptionDecoder, features: torch.Tensor, max_length: int,
                  special: SpecialTokens) -> SearchResult:  # fmt: skip
    """Pick the most likely next word at every step.

    Args:
        decoder: The trained decoder.
        features: `(B, feature_dim)` pooled or `(B, regions, feature_dim)` grid features, as the decoder reads.
        max_length: Most words per caption; a caption without `<end>` stops there.
        special: Start, end, padding and never-generated tokens.
    """
    context = decoder.prepare(features)
    return _unroll(decoder, context, decoder.initial_state(context), features.shape[0], max_length, special,
                   lambda lp: lp.argmax(dim=-1), features.device)  # fmt: skip


def sample_captions(decoder: CaptionDecoder, features: torch.Tensor, max_length: int, special: SpecialTokens,
                    samples: int = 1) -> SearchResult:  # fmt: skip
    """Draw `samples` captions per image from the model's distribution, keeping the graph.

    Rows are image-major (image 0's samples first). Used by self-critical
    training: `log_probs` and `token_log_probs` are differentiable.
    """
    context = decoder.prepare(features)
    state = decoder.expand(decoder.initial_state(context), samples)
    context = decoder.expand_context(context, samples)  # once: the samples of an image share its constants

    def draw(log_probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(log_probs.detach().exp(), 1).squeeze(1)

    # Checked every step: no draws after the last caption ends, so a seed gives the same samples as ever.
    return _unroll(decoder, context, state, features.shape[0] * samples, max_length, special, draw, features.device,
                   check_every=1)  # fmt: skip


@torch.no_grad()
def beam_search(
    decoder: CaptionDecoder,
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
    With a beam wide enough to keep every partial caption, this is an
    exhaustive search (tested).

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
    return best_beams(decoder, features, beam_size, max_length, special, length_penalty, greedy)[0]


@torch.no_grad()
def best_beams(
    decoder: CaptionDecoder,
    features: torch.Tensor,
    beam_size: int,
    max_length: int,
    special: SpecialTokens,
    length_penalty: float = 0.0,
    greedy: SearchResult | None = None,
) -> tuple[SearchResult, SearchResult]:
    """Beam search returning the best caption per image and all final beams.

    Returns:
        The best caption per image (as `beam_search`), and every beam: `tokens` `(B, beams, T)`, `log_probs` and
        `lengths` `(B, beams)`, ranked best first by the length-penalised score.
    """
    batch, device, k = features.shape[0], features.device, beam_size
    context = decoder.prepare(features)
    state = decoder.expand(decoder.initial_state(context), k)
    context = decoder.expand_context(context, k)  # once: the beams of an image share its constants
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    previous = torch.full((batch * k,), special.start, dtype=torch.long, device=device)
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, k, dtype=torch.long, device=device)
    history = torch.empty(batch, k, 0, dtype=torch.long, device=device)
    batch_offsets = (torch.arange(batch, device=device) * k).unsqueeze(1)
    logits, banned, state = _first_step(decoder, previous, state, context, special)
    # A finished beam may only continue with <pad>, at no cost, so it keeps its score.
    done_row = torch.full(banned.shape, float("-inf"), device=device)
    done_row[special.pad] = 0.0
    for step in range(max_length + 1):
        if step:
            logits, state = decoder.step(previous, state, context)
        step_log_probs = _log_probs(logits, banned).view(batch, k, -1)
        step_log_probs = torch.where(finished.unsqueeze(-1), done_row, step_log_probs)
        vocab = step_log_probs.shape[-1]
        candidates = (scores.unsqueeze(-1) + step_log_probs).view(batch, k * vocab)
        scores, flat = candidates.topk(k, dim=-1)
        beam, token = flat // vocab, flat % vocab
        history = torch.cat([history.gather(1, beam.unsqueeze(-1).expand_as(history)), token.unsqueeze(-1)], dim=-1)
        was_finished = finished.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~was_finished).long()
        finished = was_finished | (token == special.end)
        state = decoder.reorder(state, (beam + batch_offsets).view(-1))
        previous = token.view(-1)
        if _all_finished(finished, step, max_length):
            break
    (history,) = _trimmed(history, lengths)
    ranked = length_normalised(scores, lengths, length_penalty)
    order = ranked.argsort(dim=-1, descending=True)
    beams = SearchResult(history.gather(1, order.unsqueeze(-1).expand_as(history)), scores.gather(1, order),
                         lengths.gather(1, order))  # fmt: skip
    rows = torch.arange(batch, device=device)
    tokens, log_probs, best_lengths = beams.tokens[:, 0], beams.log_probs[:, 0], beams.lengths[:, 0]
    if greedy is None:
        greedy = greedy_search(decoder, features, max_length, special)
    # Prefer greedy where it scores higher (pruning can drop the greedy path).
    greedy_wins = length_normalised(greedy.log_probs, greedy.lengths, length_penalty) > ranked[rows, order[:, 0]]
    width = max(tokens.shape[1], greedy.tokens.shape[1])
    tokens = torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]), value=special.pad)
    greedy_tokens = torch.nn.functional.pad(greedy.tokens, (0, width - greedy.tokens.shape[1]), value=special.pad)
    best = SearchResult(
        torch.where(greedy_wins.unsqueeze(-1), greedy_tokens, tokens),
        torch.where(greedy_wins, greedy.log_probs, log_probs),
        torch.where(greedy_wins, greedy.lengths, best_lengths),
    )
    return best, beams
