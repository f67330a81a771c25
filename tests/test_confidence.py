"""A calibrated confidence per caption: the logistic fit recovers a known relation and is better calibrated than the
naive token probability; the replay that gives its features reproduces the search's scores on both backends; the
calibrator travels with checkpoints and exports, and both backends answer the same confidence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captioner.decoding.confidence import (
    Calibrator,
    caption_features,
    expected_calibration_error,
    naive_confidence,
    reliability,
    replay_log_probs,
)
from captioner.decoding.config import DecodingConfig, SpecialTokens
from captioner.decoding.ops import NumpyOps
from captioner.decoding.rules import rules_for
from captioner.decoding.search import decode
from captioner.decoding.torch_ops import TorchOps
from captioner.models.decoders import LSTMDecoder
from captioner.models.stepping import DecoderStepper
from captioner.text.words import Vocabulary
from tests.test_search import NumpyStepper

VOCAB = Vocabulary(["a", "red", "blue", "circle", "square", "on", "the", "left"], max_length=6)
SPECIAL = SpecialTokens.of(VOCAB)


def test_the_fit_recovers_a_known_relation_and_is_calibrated_where_the_token_probability_is_not():
    rng = np.random.default_rng(0)
    count = 4000
    features = np.stack([rng.normal(-1.0, 0.4, count), rng.normal(-3.0, 1.0, count), rng.integers(4, 14, count)], 1)
    truth = 1 / (1 + np.exp(-(2.0 * (features[:, 0] + 1.0) + 0.8 * (features[:, 1] + 3.0) - 0.3)))
    good = rng.random(count) < truth
    calibrator = Calibrator.fit(features[:3000], good[:3000], threshold=100.0)
    held_out = calibrator(features[3000:])
    assert np.abs(held_out - truth[3000:]).mean() < 0.03  # the probabilities it was drawn with
    ece, naive = (expected_calibration_error(p, good[3000:]) for p in (held_out, naive_confidence(features[3000:])))
    assert ece < 0.04 and naive > 2 * ece
    assert Calibrator.from_dict(calibrator.to_dict()) == calibrator and Calibrator.from_dict(None) is None
    bins = reliability(held_out, good[3000:])
    assert sum(row["count"] for row in bins) == 1000 and all(0 <= row["accuracy"] <= 1 for row in bins)


def test_ece_by_hand():
    confidences = np.array([0.1, 0.1, 0.9, 0.9])
    good = np.array([False, True, True, True])
    # Bin [0.1, 0.2): confidence 0.1, accuracy 0.5; bin [0.9, 1]: 0.9 and 1.0; weighted by two of four each.
    assert expected_calibration_error(confidences, good) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize(
    "config",
    [
        DecodingConfig(num_beams=1, min_length=2, bad_endings=("a", "the")),
        DecodingConfig(num_beams=3, no_repeat_ngram_size=2),
    ],
    ids=["greedy", "beam"],
)
def test_the_replayed_token_log_probabilities_add_up_to_the_searchs_score(backend, config):
    torch.manual_seed(0)
    decoder = LSTMDecoder(len(VOCAB), 8, embed_dim=8, hidden_dim=16, dropout=0.0).eval()
    features = torch.randn(5, 8)
    ops = TorchOps("cpu") if backend == "torch" else NumpyOps()
    rules = rules_for(config, SPECIAL, VOCAB, 6)

    def stepper():
        return DecoderStepper(decoder, features) if backend == "torch" else NumpyStepper(decoder, features)

    with torch.no_grad():
        decoded = decode(stepper(), 5, config, SPECIAL, ops, 6, VOCAB)
        tokens = np.asarray(ops.to_numpy(decoded.best_tokens))
        lengths = np.asarray(ops.to_numpy(decoded.best_lengths))
        replayed = replay_log_probs(stepper(), tokens, SPECIAL.start, ops, rules)
    totals = [replayed[i, : lengths[i]].sum() for i in range(5)]
    np.testing.assert_allclose(totals, np.asarray(ops.to_numpy(decoded.best_scores)), atol=1e-4)
    features_ = caption_features(replayed, lengths)
    np.testing.assert_allclose(features_[:, 0] * lengths, totals, atol=1e-4)  # the mean, times the length
    assert (features_[:, 1] <= features_[:, 0] + 1e-9).all() and (features_[:, 2] == lengths).all()


def test_the_calibrator_learns_from_the_captions_the_models_own_decoding_gives(scenes, tmp_path, monkeypatch):
    """Validation scores greedy captions (fast, comparable across runs), but a caption's confidence is asked of the
    model's own decoding (beam 2 here): the calibrator must be fitted on those, or it is over-confident on them."""
    from captioner.cli import main
    from captioner.models import captioning
    from tests.conftest import tiny_args

    seen, original = [], captioning.confidence_features

    def recording(model, features, decoded, config):
        seen.append((config.num_beams, decoded.best_tokens.shape[0]))
        return original(model, features, decoded, config)

    monkeypatch.setattr(captioning, "confidence_features", recording)
    cli = main(
        tiny_args(
            "fit",
            scenes,
            tmp_path / "work",
            tmp_path,
            "--trainer.max_epochs",
            "1",
            "--trainer.num_sanity_val_steps",
            "0",
        )
    )
    assert cli.model.decoding.num_beams == 2 and seen  # the tiny config decodes with beam 2
    assert {beams for beams, _ in seen} == {2} and sum(rows for _, rows in seen) == 20  # every validation image
    assert cli.model.confidence.calibrator is not None


def test_with_a_clip_configured_a_second_calibrator_reads_the_captions_clip_cosine(scenes, tmp_path):
    """`extra_metrics.clip_model` fits a second calibrator with the caption's CLIP cosine as a fourth feature: saved
    in the checkpoint, measured by `test` (its ECE), and used where that CLIP is loaded beside the model
    (`rerank_clip` naming it); any other captioner keeps the three-feature confidence."""
    from captioner import Captioner
    from captioner.cli import main
    from captioner.decoding.confidence import with_clip
    from captioner.evaluation.clip_rerank import ClipReranker
    from captioner.evaluation.clip_score import write_random_clip
    from captioner.models import captioning
    from tests.conftest import tiny_args

    clip_folder = str(write_random_clip(tmp_path / "clip", "a the red blue green circle square triangle".split()))
    cli = main(
        tiny_args(
            "fit",
            scenes,
            tmp_path / "work",
            tmp_path,
            "--trainer.num_sanity_val_steps",
            "0",
            "--model.extra_metrics.clip_model",
            clip_folder,
        )
    )
    model = cli.model
    calibrator, clip_calibrator = model.confidence.calibrator, model.confidence.clip_calibrator
    assert calibrator is not None and clip_calibrator is not None
    assert clip_calibrator.clip_model == clip_folder and len(clip_calibrator.weights) == 4
    assert clip_calibrator.fitted_on == calibrator.fitted_on == 20  # every validation caption
    cli.trainer.test(model, datamodule=cli.datamodule, verbose=False)
    extra = model.test_results["report"]["metrics"]
    assert 0 <= extra["confidence_clip"]["ECE"] <= 100 and extra["confidence_clip"]["captions"] == 20

    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    plain = Captioner.from_checkpoint(checkpoint, device="cpu", num_beams=2)
    assert plain.model.confidence.clip_calibrator == model.confidence.clip_calibrator  # through the checkpoint
    beside = Captioner.from_checkpoint(checkpoint, device="cpu", num_beams=2, rerank_clip=clip_folder)
    files = sorted((scenes / "Images").iterdir())[:6]
    pixels = torch.stack([plain.pixels_from_bytes(path.read_bytes()) for path in files])
    three, four = plain.describe(pixels), beside.describe(pixels)
    # By hand: the three features of each returned caption, its cosine with the image, the two calibrators.
    with torch.no_grad():
        features = plain.model.encode_images(pixels)
        decoded = captioning.decode_features(plain.model, features, plain.decoding)
        reranked, cosines = ClipReranker(clip_folder)(pixels, decoded, plain.model.vocabulary)
        base = captioning.confidence_features(plain.model, features, reranked, plain.decoding)
        plain_base = captioning.confidence_features(plain.model, features, decoded, plain.decoding)
    expected = model.confidence.clip_calibrator(with_clip(base, cosines[:, 0]))
    assert [row["confidence"] for row in four] == pytest.approx(expected.tolist(), abs=1e-4)
    expected_three = model.confidence.calibrator(plain_base).tolist()
    assert [row["confidence"] for row in three] == pytest.approx(expected_three, abs=1e-4)
    # Another CLIP beside the model (another name) cannot feed the calibrator fitted with this one.
    other = Captioner.from_checkpoint(checkpoint, device="cpu", num_beams=2, rerank_clip=clip_folder + "/")
    rows = other.describe(pixels)
    assert [row["confidence"] for row in rows] == pytest.approx(model.confidence.calibrator(base).tolist(), abs=1e-4)
