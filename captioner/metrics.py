"""Caption metrics: fast BLEU for validation (torchmetrics).

All scores are reported on a 0-100 scale, as captioning papers print them.
"""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.text import BLEUScore

BLEU_ORDERS = (1, 2, 3, 4)


def bleu_collection() -> MetricCollection:
    """BLEU-1..4 (cumulative, uniform weights, corpus level) keyed `bleu1`..`bleu4`.

    Inputs are captions already normalised by `captioner.data.vocab.normalize`
    and joined with spaces; torchmetrics' tokenizer then splits on whitespace.
    The scores reduce over ranks as sums of n-gram counts, so they are corpus
    BLEU over every image, not a mean of per-batch scores.
    """
    return MetricCollection({f"bleu{n}": BLEUScore(n_gram=n) for n in BLEU_ORDERS}, compute_groups=False)


def as_percent(scores: dict) -> dict[str, float]:
    """Tensor scores in [0, 1] -> floats on the 0-100 scale."""
    return {name: 100.0 * float(value) for name, value in scores.items()}
