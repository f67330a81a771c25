"""Self-critical sequence training: rewards, baseline, and a tiny second stage that changes the model."""

import pytest
import torch

from captioner.cider import CiderD
from captioner.cli import main
from captioner.data.vocab import Vocabulary
from captioner.models.module import CaptionModel
from tests.conftest import tiny_args

CAPTIONS = [["a red circle on the left", "the red circle"], ["a blue square", "two blue squares at the top"]]


def tiny_model(samples=3):
    torch.manual_seed(0)
    model = CaptionModel(backbone="resnet18", weights=None, image_size=32, embed_dim=8, hidden_dim=16,
                         scst=True, scst_samples=samples, init_checkpoint="unused")  # fmt: skip
    model.build(Vocabulary.build([c for refs in CAPTIONS for c in refs], min_count=1, max_length=8))
    model._cider = CiderD([[model._word_ids(c) for c in refs] for refs in CAPTIONS])
    return model


def test_self_critical_step_rewards_samples_against_the_greedy_baseline(monkeypatch):
    model = tiny_model(samples=3)
    logged = {}
    monkeypatch.setattr(model, "log", lambda name, value, **kwargs: logged.__setitem__(name, value))
    batch = {"features": torch.randn(2, 512), "references": [[" ".join(c.split()) for c in refs] for refs in CAPTIONS]}
    loss = model.self_critical_step(batch)
    assert loss.ndim == 0 and loss.requires_grad
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    assert {"train/loss", "train/reward_cider", "train/baseline_cider"} <= set(logged)
    assert float(logged["train/reward_cider"]) >= 0 and logged["train/baseline_cider"] >= 0


def test_sampled_captions_have_one_row_per_sample_and_a_differentiable_log_prob():
    from captioner.models.search import sample_captions

    model = tiny_model()
    features = torch.randn(2, 512).repeat_interleave(4, dim=0)
    result = sample_captions(model.decoder, features, 8, model.special)
    assert result.tokens.shape[0] == 8 and result.log_probs.shape == (8,) and result.log_probs.requires_grad
    assert (result.log_probs <= 0).all() and (result.lengths >= 1).all()


def test_a_tiny_scst_stage_runs_and_changes_the_model(trained, scenes_source, tmp_path):
    checkpoint, work = trained
    before = torch.load(checkpoint, weights_only=False)["state_dict"]
    cli = main(tiny_args("fit", scenes_source, work, tmp_path, "--model.scst", "true", "--model.init_checkpoint",
                         str(checkpoint), "--model.lr", "0.001", "--trainer.max_epochs", "1"))  # fmt: skip
    assert cli.datamodule.hparams.train_items == "images"
    assert "train/reward_cider" in cli.trainer.logged_metrics
    after = cli.model.state_dict()
    changed = [k for k in before if k.startswith("decoder.") and not torch.equal(before[k], after[k].cpu())]
    assert changed, "SCST did not move any decoder weight"
    unchanged = [k for k in before if k.startswith("encoder.") and torch.equal(before[k], after[k].cpu())]
    assert len(unchanged) == len([k for k in before if k.startswith("encoder.")])  # frozen, and loaded from the start


def test_scst_without_a_starting_checkpoint_is_refused(scenes_source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args("fit", scenes_source, tmp_path / "work", tmp_path, "--model.scst", "true"))
    assert exit_info.value.code == 2 and "--model.init_checkpoint" in capsys.readouterr().err
