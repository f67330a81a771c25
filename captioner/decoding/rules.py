"""Logits rules: each one small class that changes a step's scores, applied in order (Hugging Face's
`LogitsProcessorList`), the same code for the PyTorch search and the NumPy runtime (`captioner.decoding.ops`).

A rule gets the step's scores `(rows, vocab)` (the decoder's logits, before normalisation), the words generated
so far `(rows, step)` and the step, and returns the scores with some set to -inf (never chosen). The search
normalises (log-softmax) after the rules, so a caption's score is its log-probability among what the rules allow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from captioner.core.errors import CaptionerError
from captioner.decoding.config import DecodingConfig, SpecialTokens
from captioner.text.styles import marker, style_of

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
    """No `<end>` right after these words ("a", "with", ...): a caption never ends on them. At `last_word`, the
    step whose word must be the caption's last (`MaxLength` allows only `<end>` after it), they are not written."""

    words: tuple[int, ...]
    end: int
    last_word: int | None = None

    def __call__(self, scores, words, step, ops):
        if not self.words:
            return scores
        if step == self.last_word:
            scores = ops.copy(scores)
            scores[:, list(self.words)] = NEVER
        if step == 0:
            return scores
        dangling = ops.isin(words[:, step - 1], ops.as_long(list(self.words)))
        scores = ops.copy(scores)
        scores[:, self.end] = ops.where(dangling, NEVER, scores[:, self.end])
        return scores


@dataclass
class MaxLength(Rule):
    """At most `max_words` words: the step after them can only be `<end>` (captions end, never get cut)."""

    max_words: int
    end: int

    def __call__(self, scores, words, step, ops):
        if step < self.max_words:
            return scores
        only_end = ops.full(tuple(scores.shape), NEVER, ops.float)
        only_end[:, self.end] = scores[:, self.end]
        return only_end


@dataclass
class ForcedPrefix(Rule):
    """Every caption starts with these tokens: at step t < len(tokens), only `tokens[t]`."""

    tokens: tuple[int, ...]

    def __call__(self, scores, words, step, ops):
        if step >= len(self.tokens):
            return scores
        forced = ops.full(tuple(scores.shape), NEVER, ops.float)
        forced[:, self.tokens[step]] = scores[:, self.tokens[step]]
        return forced


@dataclass
class BadSequences(Rule):
    """No caption holds these token sequences: a sequence's last token is refused where the tokens before it were
    just written (a one-token sequence is never written)."""

    sequences: tuple[tuple[int, ...], ...]

    def __call__(self, scores, words, step, ops):
        if not self.sequences:
            return scores
        banned = ops.full(tuple(scores.shape), False, bool)
        rows = ops.arange(scores.shape[0])
        for sequence in self.sequences:
            head, last = sequence[:-1], sequence[-1]
            if len(head) > step:
                continue
            matches = (
                ops.all_along(words[:, step - len(head) :] == ops.as_long(list(head)).reshape(1, -1), 1)
                if (head)
                else ops.full((scores.shape[0],), True, bool)
            )
            banned[rows, last] = banned[rows, last] | matches
        return ops.where(banned, NEVER, scores)


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


def rules_for(
    config: DecodingConfig, special: SpecialTokens, vocabulary: Any = None, max_words: int | None = None
) -> list[Rule]:
    """The rules a configuration asks for, in the order they apply (the same list for every search).

    Args:
        config: The decoding settings.
        special: The special tokens.
        vocabulary: The tokenizer (`bad_endings`, `prefix` and `bad_words` are written with it), or only its ids of
            the words that are one token (a mapping).
        max_words: The most words a caption may have (None: no length rule).
    """
    word_ids = vocabulary if isinstance(vocabulary, Mapping) else getattr(vocabulary, "stoi", None) or {}
    rules: list[Rule] = [BanTokens(tuple(special.banned))]
    if max_words is not None:
        rules.append(MaxLength(max_words, special.end))
    # A model of several caption styles starts every caption with its style's marker (captioner.text.styles).
    style = style_of(config.style, tuple(getattr(vocabulary, "styles", ()) or ()))
    forced = " ".join(part for part in (marker(style) if style else None, config.prefix) if part)
    if forced:
        rules.append(ForcedPrefix(tuple(_phrases(vocabulary, forced, prefix=True)[0])))
    if config.min_length:
        rules.append(MinLength(config.min_length, special.end))
    if config.no_repeat_ngram_size:
        rules.append(NoRepeatNgram(config.no_repeat_ngram_size))
    if config.bad_endings:
        rules.append(
            BadEndings(
                tuple(word_ids[w] for w in config.bad_endings if w in word_ids),
                special.end,
                None if max_words is None else max_words - 1,
            )
        )
    if config.bad_words:
        rules.append(
            BadSequences(tuple(tuple(form) for phrase in config.bad_words for form in _phrases(vocabulary, phrase)))
        )
    return rules


def _phrases(vocabulary: Any, text: str, prefix: bool = False) -> list[list[int]]:
    """The token forms of a phrase (or of a prefix) in the tokenizer.

    Raises:
        CaptionerError: When only word ids were given (no tokenizer to write the phrase with).
    """
    if not hasattr(vocabulary, "phrase_tokens"):
        raise CaptionerError(f"{text!r}: decoding with phrases needs the model's tokenizer.")
    return [vocabulary.prefix_tokens(text)] if prefix else vocabulary.phrase_tokens(text)


def forced_phrases(config: DecodingConfig, vocabulary: Any) -> list[list[tuple[int, ...]]]:
    """`force_words` in tokens: for each entry, every token sequence that meets it (its phrases in each form)."""
    return [
        [
            tuple(form)
            for phrase in ([entry] if isinstance(entry, str) else entry)
            for form in _phrases(vocabulary, phrase)
        ]
        for entry in config.force_words
    ]


def sampling_rules(config: DecodingConfig) -> list[Rule]:
    """What shapes the distribution words are drawn from (after `rules_for`)."""
    return [Temperature(config.temperature), TopK(config.top_k), TopP(config.top_p)]


def apply(rules: Sequence[Rule], scores: Array, words: Array, step: int, ops: Any) -> Array:
    for rule in rules:
        scores = rule(scores, words, step, ops)
    return scores
