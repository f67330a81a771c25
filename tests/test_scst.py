"""Training objectives without a Trainer, and a tiny self-critical stage through the CLI."""

import pytest
import torch

from captioner.cli import main
from captioner.decoding.config import SpecialTokens
from captioner.evaluation.cider import CiderD
from captioner.models.decoders import AttentionDecoder, LSTMDecoder
from captioner.models.objectives import CrossEntropy, SelfCritical, SequenceSpec
from captioner.models.objectives.sampling import CaptionSample
from captioner.models.objectives.self_critical import with_end
from captioner.text.words import Vocabulary
from tests.conftest import tiny_args

VOCAB = Vocabulary(["a", "red", "circle", "blue", "square", "on", "the", "left"], max_length=6)
SPECIAL = SpecialTokens.of(VOCAB)
SEQUENCES = SequenceSpec(SPECIAL, 6)


def ids(text: str) -> list[int]:
    return [VOCAB.stoi[word] for word in text.split()]


REFERENCES = [[ids("a red circle"), ids("a red circle on the left")], [ids("a blue square"), ids("the blue square")]]


def prepared(samples=3, baseline="greedy") -> SelfCritical:
    objective = SelfCritical(samples=samples, baseline=baseline)
    objective.prepare(REFERENCES, SPECIAL)
    return objective


def result(rows: list[list[int]]) -> CaptionSample:
    width = max(map(len, rows))
    tokens = torch.tensor([row + [SPECIAL.pad] * (width - len(row)) for row in rows])
    return CaptionSample(tokens, torch.zeros(len(rows)), torch.tensor([len(r) for r in rows]))


def test_the_reward_includes_the_end_token():
    objective, end = prepared(), SPECIAL.end
    ended = objective.rewards(result([ids("a red circle") + [end]]), [0], SPECIAL)
    cut = objective.rewards(result([ids("a red circle")]), [0], SPECIAL)  # ran out of length, never ended
    dangling = objective.rewards(result([ids("a red circle on") + [end]]), [0], SPECIAL)
    assert ended > cut and ended > dangling
    assert with_end([*ids("a red"), end, 5, 6], SPECIAL) == [*ids("a red"), end]


def test_the_two_baselines_give_the_documented_advantages():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two images, three samples each
    greedy = prepared(3, "greedy").advantages(rewards, torch.tensor([2.0, 1.0]))
    assert torch.allclose(greedy, torch.tensor([-1.0, 0.0, 4.0, -1.0, -1.0, 2.0]))
    mean = prepared(3, "mean").advantages(rewards, None)  # reward minus the mean of the image's other samples
    assert torch.allclose(mean, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0]))
    assert torch.allclose(mean.view(2, 3).sum(dim=1), torch.zeros(2))  # an image's advantages sum to zero
    with pytest.raises(ValueError, match="samples >= 2"):
        SelfCritical(samples=1, baseline="mean")


@pytest.mark.parametrize("better", [True, False])
def test_one_step_raises_a_caption_rewarded_above_the_baseline_and_lowers_one_below(better, monkeypatch):
    """Image 0's greedy caption is "a red" (CIDEr above 0, below a full one). One sample is the perfect caption (reward
    above the baseline) or a wrong one (below): after one optimiser step its probability rose or fell."""
    from captioner.models.objectives import self_critical as module

    torch.manual_seed(0)
    decoder = LSTMDecoder(len(VOCAB), 8, embed_dim=8, hidden_dim=16, dropout=0.0).eval()  # one image: no batch norm
    features = torch.randn(1, 8)
    end = SPECIAL.end
    target = ids("a red circle on the left") + [end] if better else ids("the square on the") + [end]
    baseline = ids("a red") + [end]

    def fixed_greedy(decoder_, features_, max_length, special):
        return result([baseline])

    def scripted_samples(decoder_, features_, sequences, samples=1):
        rows = torch.tensor([target] * samples)
        inputs = torch.cat([torch.full((samples, 1), SPECIAL.start), rows[:, :-1]], dim=1)
        log_probs = torch.log_softmax(decoder_(features_.repeat(samples, 1), inputs).logits, -1)
        token_log_probs = log_probs.gather(-1, rows.unsqueeze(-1)).squeeze(-1)
        return CaptionSample(rows, token_log_probs.sum(1), torch.full((samples,), len(target)), token_log_probs)

    monkeypatch.setattr(module, "greedy_captions", fixed_greedy)
    monkeypatch.setattr(module, "sample_captions", scripted_samples)
    objective = prepared(samples=2, baseline="greedy")

    def probability() -> float:
        with torch.no_grad():
            return float(scripted_samples(decoder, features, None).log_probs[0])

    before = probability()
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.5)
    output = objective(decoder, features, {"index": torch.tensor([0])}, SEQUENCES)
    reward, greedy_reward = float(output.logs["reward_cider"]), float(output.logs["baseline_cider"])
    assert (reward > greedy_reward) == better
    output.loss.backward()
    optimizer.step()
    assert (probability() > before) == better


def test_the_loss_averages_over_tokens_and_reference_vectors_are_computed_once(monkeypatch):
    torch.manual_seed(1)
    decoder = LSTMDecoder(len(VOCAB), 8, embed_dim=8, hidden_dim=16, dropout=0.0)
    objective = prepared(samples=4, baseline="mean")
    calls = []
    original = CiderD.vector
    monkeypatch.setattr(CiderD, "vector", lambda self, tokens: calls.append(1) or original(self, tokens))
    output = objective(decoder, torch.randn(2, 8), {"index": torch.tensor([1, 0])}, SEQUENCES)
    assert len(calls) == 2 * 4  # one vector per sampled caption; the references' vectors were made in prepare()
    assert output.loss.ndim == 0 and output.loss.requires_grad and output.batch_size == 2
    assert "baseline_cider" not in output.logs  # the mean baseline needs no greedy pass


def test_cross_entropy_adds_the_decoders_own_regularizer():
    tokens = torch.tensor([[1, 4, 5, 2, 0], [1, 6, 2, 0, 0]])
    features = torch.randn(2, 3, 8)
    torch.manual_seed(0)
    plain = AttentionDecoder(len(VOCAB), 8, embed_dim=4, hidden_dim=8, attention_dim=4, dropout=0.0, regularization=0)
    torch.manual_seed(0)
    weighted = AttentionDecoder(
        len(VOCAB), 8, embed_dim=4, hidden_dim=8, attention_dim=4, dropout=0.0, regularization=2.0
    )
    batch = {"features": features, "tokens": tokens, "owners": torch.arange(2)}
    loss_plain = CrossEntropy()(plain, features, batch, SEQUENCES).loss
    loss_weighted = CrossEntropy()(weighted, features, batch, SEQUENCES).loss
    output = weighted(features, tokens[:, :-1])
    penalty = weighted.regularization(output, tokens[:, 1:] != 0)
    assert float(penalty) > 0 and torch.allclose(loss_weighted, loss_plain + penalty)


def test_a_tiny_scst_stage_runs_and_changes_the_model(trained, scenes_source, tmp_path):
    checkpoint, work = trained
    before = torch.load(checkpoint, weights_only=True)["state_dict"]
    cli = main(
        tiny_args(
            "fit",
            scenes_source,
            work,
            tmp_path,
            "--model.objective",
            "captioner.models.objectives.SelfCritical",
            "--model.init_checkpoint",
            str(checkpoint),
            "--model.lr",
            "0.001",
            "--trainer.max_epochs",
            "1",
        )
    )
    assert "train/reward_cider" in cli.trainer.logged_metrics
    after = cli.model.state_dict()
    changed = [k for k in before if k.startswith("decoder.") and not torch.equal(before[k], after[k].cpu())]
    assert changed, "SCST did not move any decoder weight"
    unchanged = [k for k in before if k.startswith("encoder.") and torch.equal(before[k], after[k].cpu())]
    assert len(unchanged) == len([k for k in before if k.startswith("encoder.")])  # frozen, and loaded from the start


def test_scst_without_a_starting_checkpoint_is_refused(scenes_source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            tiny_args(
                "fit",
                scenes_source,
                tmp_path / "work",
                tmp_path,
                "--model.objective",
                "captioner.models.objectives.SelfCritical",
            )
        )
    assert exit_info.value.code == 2 and "--model.init_checkpoint" in capsys.readouterr().err
