"""Constrained beam search: captions that hold every forced word or phrase (`DecodingConfig.force_words`), found by
searching for them, not by filtering after the fact.

Dynamic beam allocation (Post & Vilar 2018; Hugging Face's `ConstrainedBeamSearchScorer`): at every step each
image's candidates are the best continuations of its beams *and*, for each beam, the next token of every forced
phrase it has not finished (and `<end>` once it has met them all); they are grouped by how many forced tokens they
have written, and the beams are dealt out over these banks in turn, best first, from the most progress down, so
hypotheses that still have to write the forced words survive beside those that have. `<end>` is allowed only once
every constraint is met, except at the last step: a caption that cannot meet them within `max_length` is still
returned, ranked after those that do, and marked as not meeting them (`Decoded.met`), never a hang.

A constraint is a list of token sequences any one of which meets it (a phrase in each form its tokenizer writes it,
or the phrases of a disjunctive entry). The logits rules (`captioner.decoding.rules`) apply first, as everywhere. The
bookkeeping runs on the host in NumPy for either backend, so PyTorch and the exported runtime search alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from captioner.decoding.config import DecodingConfig, SpecialTokens
from captioner.decoding.decoded import Decoded, length_normalised
from captioner.decoding.rules import apply

NEVER = float("-inf")


class _Progress:
    """How far each hypothesis is through each forced phrase, and which constraints it has met."""

    def __init__(self, constraints: list[list[tuple[int, ...]]]) -> None:
        self.phrases = [(owner, phrase) for owner, alternatives in enumerate(constraints) for phrase in alternatives]
        self.count = len(constraints)
        # A met constraint counts as its longest phrase: never below a partial match of any of its phrases (else a
        # hypothesis three tokens into "blue" ranks with one that has written "red" and met the constraint).
        self.longest = [max(len(phrase) for phrase in alternatives) for alternatives in constraints]

    def advance(self, progress: tuple[int, ...], met: tuple[bool, ...], token: int) -> tuple[tuple, tuple]:
        """The state after writing `token`."""
        progress, met = list(progress), list(met)
        for index, (owner, phrase) in enumerate(self.phrases):
            if met[owner]:
                continue
            done = progress[index]
            progress[index] = done + 1 if token == phrase[done] else 1 if token == phrase[0] else 0
            if progress[index] == len(phrase):
                met[owner] = True
        return tuple(progress), tuple(met)

    def bank(self, progress: tuple[int, ...], met: tuple[bool, ...]) -> int:
        """Forced tokens written: a met constraint counts its longest phrase, an unmet one its best partial match."""
        partial = [0] * self.count
        for index, (owner, _) in enumerate(self.phrases):
            partial[owner] = max(partial[owner], progress[index])
        return sum(self.longest[c] if met[c] else partial[c] for c in range(self.count))

    def next_tokens(self, progress: tuple[int, ...], met: tuple[bool, ...]) -> set[int]:
        """The tokens that would carry a hypothesis further through a constraint it has not met."""
        return {phrase[progress[index]] for index, (owner, phrase) in enumerate(self.phrases) if not met[owner]}


class _Image:
    """One image's live hypotheses and finished captions."""

    def __init__(self, beams: int, constraints: int, phrases: int) -> None:
        self.scores = [0.0] + [NEVER] * (beams - 1)  # the first beam only: the others are copies of it
        self.words: list[list[int]] = [[] for _ in range(beams)]
        self.progress = [(0,) * phrases for _ in range(beams)]
        self.met = [(False,) * constraints for _ in range(beams)]
        self.finished: list[tuple[float, float, list[int], bool]] = []  # (normalised, score, tokens, met)
        self.done = False


def constrained_beam_search(
    stepper: Any,
    batch: int,
    config: DecodingConfig,
    special: SpecialTokens,
    ops: Any,
    max_words: int,
    rules: list,
    constraints: list[list[tuple[int, ...]]],
) -> Decoded:
    """`num_beams` hypotheses per image, dealt out over banks of progress through `constraints` (see the module
    docstring); returns `num_beams` ranked captions per image, those meeting every constraint first."""
    k, width, end = config.num_beams, max_words + 1, special.end
    progress = _Progress(constraints)
    images = [_Image(k, progress.count, len(progress.phrases)) for _ in range(batch)]
    state = stepper.start(k)
    previous = ops.as_long([special.start] * (batch * k))
    for step in range(width):
        logits, state = stepper.step(previous, state)
        words = ops.as_long([image.words[beam] for image in images for beam in range(k)]).reshape(batch * k, step)
        scored = apply(rules, ops.as_float(logits), words, step, ops)
        log_probs = ops.log_softmax(scored)
        last = step == width - 1
        offered = _best_offers(images, log_probs, ops, k, end, last)
        log_probs = ops.to_numpy(log_probs).reshape(batch, k, -1)
        rows, tokens = [], []
        for number, image in enumerate(images):
            chosen = _step_image(image, log_probs[number], offered[number], k, end, last, progress, step, config)
            rows += [number * k + beam for beam, _ in chosen]
            tokens += [token for _, token in chosen]
        state = stepper.reorder(state, ops.as_long(rows))
        previous = ops.as_long(tokens)
        if all(image.done for image in images):
            break
    return _ranked(images, k, width, special, ops)


def _best_offers(
    images: list[_Image], log_probs: Any, ops: Any, k: int, end: int, last: bool
) -> list[list[tuple[int, int]]]:
    """Each image's `2k` best continuations as (beam, token). They lie among each beam's `2k + 1` most likely tokens
    (one more for an end that is not allowed yet: no end before the forced words are met, except when the length runs
    out), so a top-k on the device replaces a partition of every beam's whole vocabulary."""
    batch = len(images)
    values, tokens = ops.topk(log_probs, min(2 * k + 1, log_probs.shape[-1]))
    values = ops.to_numpy(values).reshape(batch, k, -1).astype(np.float64)
    tokens = ops.to_numpy(tokens).reshape(batch, k, -1)
    totals = np.asarray([image.scores for image in images])[:, :, None] + values
    if not last:
        unmet = np.asarray([[not all(met) for met in image.met] for image in images])
        totals[(tokens == end) & unmet[:, :, None]] = NEVER
    flat = totals.reshape(batch, -1)
    best = np.argsort(-flat, axis=1, kind="stable")[:, : 2 * k]
    beams = best // tokens.shape[2]
    return [
        [(int(beam), int(token)) for beam, token in zip(beams[n], tokens[n].reshape(-1)[best[n]], strict=True)]
        for n in range(batch)
    ]


def _step_image(
    image: _Image,
    log_probs: np.ndarray,
    offered: list[tuple[int, int]],
    k: int,
    end: int,
    last: bool,
    progress: _Progress,
    step: int,
    config: DecodingConfig,
) -> list[tuple[int, int]]:
    """One step of one image: offer its candidates (the best continuations and every constraint's next token),
    keep `k` live hypotheses by bank. Returns (beam, token) per slot (a finished image keeps feeding its
    hypotheses, whose results no longer matter)."""
    if image.done:  # its words still grow, as the others' do: the rules read every row at the same length
        image.words = [[*words, end] for words in image.words]
        return [(beam, end) for beam in range(k)]
    candidates: set[tuple[int, int]] = set(offered)
    for beam in range(k):
        if np.isfinite(image.scores[beam]):
            candidates.update((beam, token) for token in progress.next_tokens(image.progress[beam], image.met[beam]))
            if all(image.met[beam]):
                candidates.add((beam, end))  # a hypothesis that met every constraint is always offered as finished
    live: dict[int, list[tuple[float, int, int, tuple, tuple]]] = {}
    for beam, token in sorted(candidates):
        score = image.scores[beam] + float(log_probs[beam, token])
        if not np.isfinite(score) or (token == end and not last and not all(image.met[beam])):
            continue
        if token == end:
            met = all(image.met[beam])
            normalised = float(length_normalised(score, step + 1, config.length_penalty))
            image.finished.append((normalised, score, [*image.words[beam], end], met))
            continue
        new_progress, new_met = progress.advance(image.progress[beam], image.met[beam], token)
        live.setdefault(progress.bank(new_progress, new_met), []).append((score, beam, token, new_progress, new_met))
    image.finished = sorted(image.finished, key=lambda f: (f[3], f[0]), reverse=True)[: 2 * k]
    chosen = _dealt(live, k)
    image.scores = [score for score, *_ in chosen] + [NEVER] * (k - len(chosen))
    slots = [(beam, token) for _, beam, token, _, _ in chosen] + [(0, end)] * (k - len(chosen))
    image.words = [[*image.words[beam], token] for beam, token in slots]
    image.progress = [new for *_, new, _ in chosen] + [(0,) * len(progress.phrases)] * (k - len(chosen))
    image.met = [met for *_, met in chosen] + [(False,) * progress.count] * (k - len(chosen))
    image.done = last or _settled(image, k, step + 1, config)
    return slots


def _dealt(live: dict[int, list], k: int) -> list:
    """`k` hypotheses dealt over the banks in turn, from the most progress down, each bank's best first."""
    banks = [sorted(live[bank], key=lambda option: -option[0]) for bank in sorted(live, reverse=True)]
    chosen: list = []
    while len(chosen) < k and any(banks):
        for bank in banks:
            if bank and len(chosen) < k:
                chosen.append(bank.pop(0))
    return chosen


def _settled(image: _Image, k: int, length: int, config: DecodingConfig) -> bool:
    """Whether `k` captions meeting every constraint are in and no live hypothesis could beat the worst of them."""
    met = [f for f in image.finished if f[3]]
    live = [score for score in image.scores if np.isfinite(score)]
    if len(met) < k or not live:
        return len(met) >= k or not live
    if config.early_stopping is True:
        return True
    worst = met[k - 1][0]
    return max(float(length_normalised(score, length, config.length_penalty)) for score in live) <= worst


def _ranked(images: list[_Image], k: int, width: int, special: SpecialTokens, ops: Any) -> Decoded:
    """Each image's `k` best captions: those meeting every constraint first, by normalised score."""
    tokens = np.full((len(images), k, width), special.pad, dtype=np.int64)
    scores = np.full((len(images), k), NEVER, dtype=np.float32)
    normalised = np.full((len(images), k), NEVER, dtype=np.float32)
    lengths = np.zeros((len(images), k), dtype=np.int64)
    met = np.zeros((len(images), k), dtype=bool)
    for number, image in enumerate(images):
        ranked = sorted(image.finished, key=lambda f: (f[3], f[0]), reverse=True)[:k]
        for rank, (norm, score, caption, meets) in enumerate(ranked):
            tokens[number, rank, : len(caption)] = caption
            scores[number, rank], normalised[number, rank] = score, norm
            lengths[number, rank], met[number, rank] = len(caption), meets
    used = max(int(lengths.max()), 1)
    return Decoded(
        ops.from_numpy(tokens[..., :used]),
        ops.from_numpy(scores),
        ops.from_numpy(lengths),
        ops.from_numpy(normalised),
        ops.from_numpy(met),
    )
