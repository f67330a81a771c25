"""Metric wrappers against values worked out by hand."""

import logging
import math

import pytest

from captioner.evaluation import metrics
from captioner.evaluation.metrics import as_percent, bleu_collection, caption_diversity, coco_caption_scores

# "a red circle on the left" against "a red circle on the right": 6 words each,
# matches 5/6 unigrams, 4/5 bigrams, 3/4 trigrams, 2/3 4-grams, no brevity penalty.
HYPOTHESIS, REFERENCE = "a red circle on the left", "a red circle on the right"
HAND_BLEU = {n: 100 * math.prod([5 / 6, 4 / 5, 3 / 4, 2 / 3][:n]) ** (1 / n) for n in (1, 2, 3, 4)}
HAND_ROUGE_L = 100 * 5 / 6  # LCS 5 of 6 words on both sides: precision = recall = F = 5/6


def test_torchmetrics_bleu_matches_the_hand_computed_example():
    bleu = bleu_collection()
    bleu.update([HYPOTHESIS], [[REFERENCE]])
    scores = as_percent(bleu.compute())
    for n in (1, 2, 3, 4):
        assert scores[f"bleu{n}"] == pytest.approx(HAND_BLEU[n], abs=1e-3)
    assert HAND_BLEU[4] == pytest.approx(100 * (1 / 3) ** 0.25)


@pytest.fixture(params=["java", "no-java"])
def java(request, monkeypatch, caplog):
    monkeypatch.setenv(metrics.JAVA_VARIABLE, "1")  # the suite leaves Java out (conftest); here it is the subject
    if request.param == "no-java":
        monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    elif not metrics.java_available():
        pytest.skip("no Java on this machine")
    caplog.set_level(logging.WARNING)
    return request.param


def test_coco_scores_hand_example_perfect_and_disjoint(java, caplog):
    example = coco_caption_scores({"a": HYPOTHESIS}, {"a": [REFERENCE]})["scores"]
    for n in (1, 2, 3, 4):
        assert example[f"BLEU-{n}"] == pytest.approx(HAND_BLEU[n], abs=1e-3)
    assert example["ROUGE-L"] == pytest.approx(HAND_ROUGE_L, abs=1e-3)

    refs = {"a": ["a red circle on the right", "the red circle sits right"], "b": ["two blue squares side by side"]}
    perfect = coco_caption_scores({"a": "a red circle on the right", "b": "two blue squares side by side"}, refs)
    disjoint = coco_caption_scores({"a": "green triangles everywhere", "b": "nothing at all here"}, refs)
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert perfect["scores"][name] == pytest.approx(100.0, abs=1e-4)
    assert set(disjoint["scores"]) == set(perfect["scores"])
    assert all(value == pytest.approx(0.0, abs=1e-6) for value in disjoint["scores"].values())
    assert perfect["scores"]["CIDEr"] > 100 and disjoint["scores"]["CIDEr"] == 0

    if java == "java":
        assert perfect["scores"]["METEOR"] > 99 and perfect["tokenizer"].startswith("PTB")
        assert "Java was not found" not in caplog.text
    else:
        assert "METEOR" not in perfect["scores"] and "no Java" in perfect["tokenizer"]
        assert caplog.text.count("Java was not found") == 3  # once per call, not once per scorer


def test_meteor_starts_once_per_process_and_a_failed_call_ends_it(monkeypatch):
    """METEOR's Java start (5 s of paraphrase tables) is paid once: later evaluations reuse the process, each scored
    on its own (equal to COCOEvalCap's own fresh METEOR: tests/test_evaluation.py); a failed call ends the process
    (its pipes may hold half an answer) so the next starts a clean one."""
    if not metrics.shutil.which("java"):
        pytest.skip("no Java on this machine")
    monkeypatch.setenv(metrics.JAVA_VARIABLE, "1")
    refs = {"a": ["a red circle on the right", "the red circle sits right"], "b": ["two blue squares side by side"]}
    corpora = [{"a": "a red circle", "b": "two squares"}, {"a": "a circle on the right", "b": "blue squares"}]
    started = []
    real = metrics._owned_meteor
    monkeypatch.setattr(metrics, "_owned_meteor", lambda: started.append(1) or real())
    monkeypatch.setattr(metrics, "_METEOR", metrics._MeteorProcess())
    kept = [coco_caption_scores(corpus, refs)["scores"]["METEOR"] for corpus in [*corpora, corpora[0]]]
    assert len(started) == 1 and kept[0] == kept[2] != kept[1]  # one start; each corpus scored on its own

    process = metrics._METEOR.meteor.meteor_p
    monkeypatch.setattr(metrics._METEOR.meteor, "compute_score", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        coco_caption_scores(corpora[0], refs)
    assert process.wait(timeout=10) is not None and metrics._METEOR.meteor is None  # ended and dropped


def test_java_can_be_left_out_where_it_is_installed(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
    for value, expected in (("0", False), ("off", False), ("1", True)):
        monkeypatch.setenv(metrics.JAVA_VARIABLE, value)
        assert metrics.java_available() is expected, value
    monkeypatch.delenv(metrics.JAVA_VARIABLE)
    assert metrics.java_available()  # on by default


def test_diversity_makes_a_constant_model_obvious():
    constant = caption_diversity(["a red circle"] * 10)
    assert constant == {"distinct_captions": 10.0, "vocabulary_used": 3, "mean_length": 3.0}
    varied = caption_diversity(["a red circle", "a blue square on the left", "A red circle."])
    assert varied["distinct_captions"] == 100.0 and varied["vocabulary_used"] == 8
    assert varied["mean_length"] == pytest.approx(12 / 3)


def test_cider_d_on_token_ids_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    from captioner.evaluation.cider import CiderD

    refs = {
        "a": ["a red circle on the left", "the red circle is on the left side"],
        "b": ["two blue squares side by side", "blue squares"],
        "c": ["a green triangle at the top"],
    }
    hyps = {"a": "a red circle on the right", "b": "two blue squares", "c": "a green circle at the top"}
    words: dict[str, int] = {}

    def ids(text):
        return [words.setdefault(word, len(words)) for word in text.split()]

    expected, per_image = Cider().compute_score(refs, {k: [v] for k, v in hyps.items()})
    scorer = CiderD([[ids(r) for r in refs[k]] for k in refs])  # document frequencies from the same references
    ours = [scorer.score(ids(hyps[k]), [ids(r) for r in refs[k]]) for k in refs]
    assert ours == pytest.approx(list(per_image), abs=1e-9)
    assert sum(ours) / 3 == pytest.approx(expected, abs=1e-9)
    assert scorer.score(ids("purple hexagons"), [ids(r) for r in refs["a"]]) == 0.0
