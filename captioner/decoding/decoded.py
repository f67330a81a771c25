"""What a search returns: ranked captions per image, and how they are ranked (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Array = Any


@dataclass
class Decoded:
    """Captions for a batch, ranked best first per image.

    Attributes:
        tokens: `(B, N, T)` generated tokens without `<start>`; after `<end>` only `<pad>`.
        scores: `(B, N)` total log-probabilities, `<end>` included.
        lengths: `(B, N)` generated tokens, `<end>` included.
        normalised: `(B, N)` the length-normalised scores they are ranked by.
        met: `(B, N)` whether each caption holds every forced word (None: no `force_words` asked for).
    """

    tokens: Array
    scores: Array
    lengths: Array
    normalised: Array
    met: Array | None = None

    @property
    def best_tokens(self) -> Array:
        return self.tokens[:, 0]

    @property
    def best_scores(self) -> Array:
        return self.scores[:, 0]

    @property
    def best_lengths(self) -> Array:
        return self.lengths[:, 0]


def length_normalised(scores: Array, lengths: Array, length_penalty: float) -> Array:
    """GNMT length normalisation: `score / ((5 + length) / 6) ** length_penalty`; 0 keeps raw scores.

    With `length_penalty` > 0 a longer caption's (more negative) total is divided by more, so longer captions
    are favoured over short ones of similar per-word probability.
    """
    if length_penalty == 0:
        return scores
    return scores / ((5.0 + lengths) / 6.0) ** length_penalty
