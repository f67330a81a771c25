"""Caption metrics: fast BLEU for validation, the COCO caption suite for test, and diversity.

All scores are on a 0-100 scale, as captioning papers print them (CIDEr too:
CIDEr-D x 100, so 94.0 means 0.940).

- Validation: torchmetrics' BLEUScore and CIDEr-D on token ids (document
  frequencies from the validation references) on greedy captions, both sides
  normalised like the vocabulary. Fast, comparable between runs of this
  project, not to papers.
- Test: pycocoevalcap (the COCO caption evaluation code) on beam-search
  captions against the raw reference captions, both PTB-tokenized by Stanford
  CoreNLP (Java), exactly as the COCO caption evaluation does. These are the
  numbers papers report.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.text import BLEUScore

from captioner.evaluation.cider import CiderD, NgramVector
from captioner.text.words import normalize

log = logging.getLogger(__name__)

BLEU_ORDERS = (1, 2, 3, 4)
PTB_TOKENIZER = "PTB (Stanford CoreNLP, Java)"
FALLBACK_TOKENIZER = "captioner.text.words.normalize (no Java)"


def bleu_collection() -> MetricCollection:
    """BLEU-1..4 (cumulative, uniform weights, corpus level) keyed `bleu1`..`bleu4`.

    Inputs are captions already normalised by `captioner.text.words.normalize`
    and joined with spaces; torchmetrics' tokenizer then splits on whitespace.
    The scores reduce over ranks as sums of n-gram counts, so they are corpus
    BLEU over every image, not a mean of per-batch scores.
    """
    return MetricCollection({f"bleu{n}": BLEUScore(n_gram=n) for n in BLEU_ORDERS}, compute_groups=False)


class CorpusCider(Metric):
    """Mean CIDEr-D (x 100) of generated captions, as token ids, against a fixed reference corpus.

    Document frequencies come from the corpus given to `set_references` (the
    validation references), so every rank holding the same corpus scores an
    image the same way and the mean reduces over ranks as a sum and a count.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.scorer: CiderD | None = None
        self.reference_vectors: list[list[NgramVector]] = []

    def set_references(self, references: Sequence[Sequence[Sequence[int]]]) -> None:
        """The corpus: every image's references as word ids; their n-gram vectors are computed once here."""
        self.scorer = CiderD(references)
        self.reference_vectors = [self.scorer.vectors(refs) for refs in references]

    def update(self, candidates: Sequence[Sequence[int]], images: Sequence[int]) -> None:
        """Score each candidate (word ids) against the references of corpus image `images[i]`."""
        if self.scorer is None:
            raise RuntimeError("CorpusCider.set_references() must be called first")
        for candidate, image in zip(candidates, images):
            self.total += self.scorer.score_vectors(candidate, self.reference_vectors[int(image)])
        self.count += len(candidates)

    def compute(self) -> torch.Tensor:
        return 100.0 * self.total / self.count.clamp(min=1)


def as_percent(scores: Mapping) -> dict[str, float]:
    """Tensor scores in [0, 1] -> floats on the 0-100 scale."""
    return {name: 100.0 * float(value) for name, value in scores.items()}


# Set to 0 to leave Java out where it is installed: the PTB tokenizer and METEOR then give way to the vocabulary's
# normaliser, as on a machine without Java (METEOR's start costs about 5 s of every evaluation).
JAVA_VARIABLE = "CAPTIONER_JAVA"


def java_available() -> bool:
    """Whether the PTB tokenizer and METEOR can run: a `java` executable on the PATH, not turned off with
    `CAPTIONER_JAVA=0`."""
    if os.environ.get(JAVA_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return shutil.which("java") is not None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence pycocoevalcap's prints and its Java tools' progress lines (file descriptors 1 and 2)."""
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        try:
            for fd in (1, 2):
                os.dup2(devnull.fileno(), fd)
            yield
        finally:
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def _tokenize(captions: Mapping[str, Sequence[str]], use_java: bool) -> dict[str, list[str]]:
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        payload = {key: [{"caption": c} for c in values] for key, values in captions.items()}
        return PTBTokenizer().tokenize(payload)
    return {key: [" ".join(normalize(c)) for c in values] for key, values in captions.items()}


class _MeteorProcess:
    """One METEOR process (pycocoevalcap's `Meteor`, a Java program) kept for this Python process: its start loads
    paraphrase tables, about 5 s of every evaluation; each EVAL it answers reads only the statistics sent with it,
    so evaluations through one process score as through fresh ones.

    A call that fails drops the process (its pipes may hold half an answer), and a forked child starts its own
    rather than writing into its parent's pipes.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.meteor: Any = None
        atexit.register(self.close)

    def score(self, gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
        """Corpus METEOR of `res` against `gts` (PTB-tokenized, as pycocoevalcap's scorers take them)."""
        with self.lock:
            if self.meteor is None or self.meteor.owner != os.getpid():
                self.meteor = _owned_meteor()
            try:
                return float(self.meteor.compute_score(gts, res)[0])
            except BaseException:
                self.meteor.close()
                self.meteor = None
                raise

    def close(self) -> None:
        """End the METEOR process (at exit)."""
        with self.lock:
            if self.meteor is not None:
                self.meteor.close()
                self.meteor = None


def _owned_meteor() -> Any:
    from pycocoevalcap.meteor.meteor import Meteor

    class OwnedMeteor(Meteor):
        """pycocoevalcap's `Meteor`, closed once and only by the process that started it: a forked child's copy
        would otherwise kill its parent's METEOR when collected."""

        def __init__(self) -> None:
            super().__init__()
            self.owner, self.closed = os.getpid(), False

        def close(self) -> None:
            if self.owner == os.getpid() and not self.closed:
                self.closed = True
                with contextlib.suppress(Exception):
                    self.meteor_p.stdin.close()
                    self.meteor_p.kill()
                    self.meteor_p.wait(timeout=10)

        def __del__(self) -> None:
            self.close()

    return OwnedMeteor()


_METEOR = _MeteorProcess()


def coco_caption_scores(captions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) from pycocoevalcap, on a 0-100 scale.

    Args:
        captions: One generated caption per image id.
        references: The reference captions of every image id in `captions`.

    Returns:
        `{"scores": {"BLEU-1": ..., "METEOR": ..., "ROUGE-L": ..., "CIDEr": ...}, "tokenizer": ...}`.
        Without Java (or with `CAPTIONER_JAVA=0`), the text is tokenized with the vocabulary's normaliser
        and METEOR is left out, with one warning.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = sorted(captions)
    use_java = java_available()
    if not use_java:
        turned_off = shutil.which("java") is not None
        log.warning(
            "%s: METEOR is skipped and captions are tokenized with the vocabulary's normaliser instead of the PTB "
            "tokenizer, so these scores are close to, but not exactly, the COCO evaluation's. %s",
            f"Java is turned off ({JAVA_VARIABLE}=0)" if turned_off else "Java was not found",
            f"Unset {JAVA_VARIABLE} for the full suite."
            if turned_off
            else "Install a Java runtime (e.g. openjdk-17-jre-headless) for the full suite.",
        )
    with _quiet():
        gts = _tokenize({k: list(references[k]) for k in keys}, use_java)
        res = _tokenize({k: [captions[k]] for k in keys}, use_java)
        scores: dict[str, float] = {}
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores.update({f"BLEU-{n}": 100.0 * float(value) for n, value in zip(BLEU_ORDERS, bleu)})
        if use_java:
            scores["METEOR"] = 100.0 * _METEOR.score(gts, res)
        scores["ROUGE-L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    return {"scores": scores, "tokenizer": PTB_TOKENIZER if use_java else FALLBACK_TOKENIZER}


def caption_diversity(captions: Sequence[str]) -> dict[str, float]:
    """How varied the generated captions are; a model that says the same thing everywhere shows here.

    Returns:
        `distinct_captions` (% of captions that are unique strings),
        `vocabulary_used` (distinct words over all captions) and
        `mean_length` (words per caption).
    """
    if not captions:
        return {"distinct_captions": 0.0, "vocabulary_used": 0, "mean_length": 0.0}
    words = [normalize(caption) for caption in captions]
    return {
        "distinct_captions": 100.0 * len(set(captions)) / len(captions),
        "vocabulary_used": len({w for caption in words for w in caption}),
        "mean_length": sum(map(len, words)) / len(words),
    }
