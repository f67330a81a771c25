"""Logits rules: each one small class that changes a step's scores, applied in order (Hugging Face's
`LogitsProcessorList`), the same code for the PyTorch search and the NumPy runtime (`captioner.decoding.ops`).

A rule gets the step's scores `(rows, vocab)` (the decoder's logits, before normalisation), the words generated
so far `(rows, step)` and the step, and returns the scores with some set to -inf (never chosen). The search
normalises (log-softmax) after the rules, so a caption's score is its log-probability among what the rules allow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from captioner.decoding.config import DecodingConfig, SpecialTokens

Array = Any
NEVER = float("-inf")


class Rule:
    """Base class: `__call__(scores, words, step, ops) -> scores`."""

    def __call__(self, scores: Array, words: Array, step: int, ops: Any) -> Array:
        raise NotImplementedError


@dataclass
class BanTokens(Rule):
    """Never emit these tokens (`<pad>`, `<start>`, `<unk>`)."""

    tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        self._masks: dict[tuple[int, int], Array] = {}

    def __call__(self, scores, words, step, ops):
        key = (id(ops), scores.shape[-1])
        if key not in self._masks:  # built once per search: no host-to-device copy at every step
            banned = ops.full((scores.shape[-1],), False, bool)
            banned[ops.as_long(list(self.tokens))] = True
            self._masks[key] = banned
        return ops.where(self._masks[key], NEVER, scores)


@dataclass
class MinLength(Rule):
    """No `<end>` before `min_length` words."""

    min_length: int
    end: int

    def __call__(self, scores, words, step, ops):
        if step >= self.min_length:
            return scores
        scores = ops.copy(scores)
        scores[:, self.end] = NEVER
        return scores


@dataclass
class NoRepeatNgram(Rule):
    """No n-gram twice: a word that would complete an n-gram already in the caption is not allowed."""

    size: int

    def __call__(self, scores, words, step, ops):
        n = self.size
        if n < 1 or step < n - 1 or words.shape[1] < n:
            return scores
        tail = words[:, step - n + 1 :] if n > 1 else None  # the last n - 1 words
        banned = ops.full(tuple(scores.shape), False, bool)
        rows = ops.arange(scores.shape[0])
        for start in range(step - n + 1):  # every earlier n-gram: its first n - 1 words, then its last
            matches = ops.all_along(words[:, start : start + n - 1] == tail, 1) if n > 1 else True
            following = words[:, start + n - 1]
            banned[rows, following] = banned[rows, following] | matches
        return ops.where(banned, NEVER, scores)


@dataclass
class BadEndings(Rule):
    """No `<end>` right after these words ("a", "with", ...): a caption never ends on them."""

    words: tuple[int, ...]
    end: int

    def __call__(self, scores, words, step, ops):
        if not self.words or step == 0:
            return scores
        dangling = ops.isin(words[:, step - 1], ops.as_long(list(self.words)))
        scores = ops.copy(scores)
        scores[:, self.end] = ops.where(dangling, NEVER, scores[:, self.end])
        return scores


@dataclass
class Temperature(Rule):
    """Flatten (> 1) or sharpen (< 1) the distribution sampled from."""

    temperature: float

    def __call__(self, scores, words, step, ops):
        return scores / self.temperature if self.temperature != 1.0 else scores


@dataclass
class TopK(Rule):
    """Sample among the k most likely words only."""

    k: int

    def __call__(self, scores, words, step, ops):
        if not 0 < self.k < scores.shape[-1]:
            return scores
        kth = ops.topk(scores, self.k)[0][:, -1:]
        return ops.where(scores < kth, NEVER, scores)


@dataclass
class TopP(Rule):
    """Sample among the fewest most likely words whose probability reaches p (nucleus sampling)."""

    p: float

    def __call__(self, scores, words, step, ops):
        if self.p >= 1.0:
            return scores
        ranked, order = ops.topk(scores, scores.shape[-1])
        probabilities = ops.softmax(ranked)
        before = ops.cumsum(probabilities) - probabilities  # the mass of the words ranked above each one
        keep_ranked = before < self.p  # the first word is always kept
        keep = ops.full(tuple(scores.shape), False, bool)
        rows = ops.arange(scores.shape[0]).reshape(-1, 1)
        keep[rows, order] = keep_ranked
        return ops.where(keep, scores, NEVER)


def rules_for(config: DecodingConfig, special: SpecialTokens, word_ids: dict[str, int] | None = None) -> list[Rule]:
    """The rules a configuration asks for, in the order they apply (the same list for every search)."""
    rules: list[Rule] = [BanTokens(tuple(special.banned))]
    if config.min_length:
        rules.append(MinLength(config.min_length, special.end))
    if config.no_repeat_ngram_size:
        rules.append(NoRepeatNgram(config.no_repeat_ngram_size))
    if config.bad_endings:
        known = word_ids or {}
        rules.append(BadEndings(tuple(known[w] for w in config.bad_endings if w in known), special.end))
    return rules


def sampling_rules(config: DecodingConfig) -> list[Rule]:
    """What shapes the distribution words are drawn from (after `rules_for`)."""
    return [Temperature(config.temperature), TopK(config.top_k), TopP(config.top_p)]


def apply(rules: Sequence[Rule], scores: Array, words: Array, step: int, ops: Any) -> Array:
    for rule in rules:
        scores = rule(scores, words, step, ops)
    return scores
