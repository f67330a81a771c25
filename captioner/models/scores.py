"""The scores a `CaptionModel` keeps while it evaluates: BLEU-1..4 (torchmetrics, reduced over ranks) for validation
and test, and validation CIDEr-D on token ids (document frequencies from the validation references), as one module
so Lightning moves and syncs them with the model."""

from __future__ import annotations

from typing import Any

from torch import nn

from captioner.evaluation.metrics import CorpusCider, as_percent, bleu_collection
from captioner.text.words import normalize


class CaptionScores(nn.Module):
    """Validation and test scores of the captions a model decodes (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.val_bleu, self.test_bleu = bleu_collection(), bleu_collection()
        self.val_cider = CorpusCider()

    def add(self, stage: str, vocabulary: Any, tokens: Any, references: list) -> None:
        """A batch's best captions (`tokens`) against their references, for `stage` ("val" or "test")."""
        hypotheses = [" ".join(normalize(text)) for text in vocabulary.decode_batch(tokens)]  # as the references
        (self.val_bleu if stage == "val" else self.test_bleu).update(hypotheses, references)

    def set_val_references(self, references: Any) -> None:
        """The validation references, once: they are fixed for the whole run."""
        if self.val_cider.scorer is None:
            self.val_cider.set_references(references)

    def add_val_cider(self, words: list, images: list[int]) -> None:
        """A validation batch's captions (`words`, of images `images`) into the corpus CIDEr-D."""
        self.val_cider.update(words, images)

    def val_ciders(self, words: list, images: list[int]) -> list[float]:
        """Each caption's own CIDEr-D (x 100) against its image's validation references (for the confidence)."""
        scorer, vectors = self.val_cider.scorer, self.val_cider.reference_vectors
        return [100 * scorer.score_vectors(w, vectors[i]) for w, i in zip(words, images)]

    def validation(self) -> dict[str, float]:
        """The validation's scores (`val/bleu1`..`val/cider`), then reset for the next."""
        scores = {f"val/{name}": value for name, value in as_percent(self.val_bleu.compute()).items()}
        scores["val/cider"] = float(self.val_cider.compute())
        self.val_bleu.reset()
        self.val_cider.reset()
        return scores

    def test(self) -> dict[str, float]:
        """The test's BLEU-1..4 (0-100), then reset."""
        bleu = as_percent(self.test_bleu.compute())
        self.test_bleu.reset()
        return bleu
