"""CIDEr-D on token ids, for self-critical rewards and the validation score.

The same formula as the COCO caption evaluation's CIDEr-D (pycocoevalcap):
TF-IDF weighted n-grams (n = 1..4) with document frequencies from a
reference corpus, clipped similarity, a Gaussian length penalty (sigma 6)
and a factor of 10. Captions are id sequences, so scoring a batch needs no
tokenizer and no Java. Reference vectors depend only on the references and
the corpus, so callers that score the same images again (every epoch of
self-critical training) compute them once with `vectors` and reuse them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

NgramVector = tuple[list[dict[tuple[int, ...], float]], list[float], int]  # per-order weights, norms, length


def _ngrams(tokens: Sequence[int], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


class CiderD:
    """CIDEr-D scorer with document frequencies from a reference corpus.

    Args:
        corpus: For every image, its reference captions as token-id sequences.
        n: Largest n-gram order.
        sigma: Width of the length penalty.
    """

    def __init__(self, corpus: Iterable[Sequence[Sequence[int]]], n: int = 4, sigma: float = 6.0) -> None:
        self.n, self.sigma = n, sigma
        self.document_frequency: Counter = Counter()
        images = 0
        for references in corpus:
            images += 1
            self.document_frequency.update({gram for ref in references for gram in _ngrams(ref, n)})
        if images == 0:
            raise ValueError("CIDEr-D needs at least one reference image")
        self.log_images = math.log(float(images))

    def vector(self, tokens: Sequence[int]) -> NgramVector:
        """The TF-IDF n-gram vector of one caption, with its norms and length."""
        vector: list[dict[tuple[int, ...], float]] = [{} for _ in range(self.n)]
        for gram, count in _ngrams(tokens, self.n).items():
            df = math.log(max(1.0, self.document_frequency[gram]))
            vector[len(gram) - 1][gram] = count * (self.log_images - df)
        norms = [math.sqrt(sum(v * v for v in order.values())) for order in vector]
        return vector, norms, len(tokens)

    def vectors(self, captions: Sequence[Sequence[int]]) -> list[NgramVector]:
        """`vector` of each caption (precompute an image's references once)."""
        return [self.vector(caption) for caption in captions]

    def _similarity(self, hypothesis: NgramVector, reference: NgramVector) -> float:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hypothesis, reference
        penalty = math.exp(-((len_h - len_r) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for order in range(self.n):
            overlap = sum(
                min(value, vec_r[order].get(gram, 0.0)) * vec_r[order].get(gram, 0.0)
                for gram, value in vec_h[order].items()
            )
            if norm_h[order] and norm_r[order]:
                total += overlap / (norm_h[order] * norm_r[order]) * penalty
        return total / self.n

    def score_vectors(self, candidate: Sequence[int], references: Sequence[NgramVector]) -> float:
        """CIDEr-D of one caption against precomputed reference vectors (0 for no references)."""
        if not references:
            return 0.0
        hypothesis = self.vector(candidate)
        return 10.0 * sum(self._similarity(hypothesis, reference) for reference in references) / len(references)

    def score(self, candidate: Sequence[int], references: Sequence[Sequence[int]]) -> float:
        """CIDEr-D of one caption against its references (0 for no references)."""
        return self.score_vectors(candidate, self.vectors(references))

    def batch(self, candidates: Sequence[Sequence[int]], references: Sequence[Sequence[Sequence[int]]]) -> list[float]:
        """Scores for parallel lists of candidates and their references."""
        return [self.score(c, r) for c, r in zip(candidates, references)]
