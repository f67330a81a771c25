import pytest
import torch

from captioner.data.vocab import Vocabulary
from captioner.models.decoder import AttentionDecoder, CaptionDecoder, caption_loss, doubly_stochastic_penalty
from captioner.models.search import SpecialTokens, beam_search, greedy_search

VOCAB = Vocabulary([f"w{i}" for i in range(20)], max_length=8)
SPECIAL = SpecialTokens.of(VOCAB)


REGIONS = 4


def make_decoder(seed=0, kind="lstm"):
    torch.manual_seed(seed)
    if kind == "attention":
        decoder = AttentionDecoder(len(VOCAB), feature_dim=16, embed_dim=8, hidden_dim=12, attention_dim=6, dropout=0.0)
    else:
        decoder = CaptionDecoder(len(VOCAB), feature_dim=16, embed_dim=8, hidden_dim=12, num_layers=2, dropout=0.0)
    decoder.eval()
    return decoder


def make_features(batch, kind="lstm"):
    return torch.randn(batch, REGIONS, 16) if kind == "attention" else torch.randn(batch, 16)


KINDS = pytest.mark.parametrize("kind", ["lstm", "attention"])


def test_shapes():
    decoder = make_decoder()
    features, tokens = torch.randn(3, 16), torch.randint(0, len(VOCAB), (3, 7))
    assert decoder(features, tokens).shape == (3, 7, len(VOCAB))
    h, c = decoder.init_state(features)
    assert h.shape == c.shape == (2, 3, 12)
    logits, (h2, _) = decoder.step(tokens[:, 0], (h, c))
    assert logits.shape == (3, len(VOCAB)) and h2.shape == (2, 3, 12)


def test_padding_does_not_count_in_the_loss():
    logits = torch.randn(2, 4, len(VOCAB))
    targets = torch.tensor([[5, 6, 2, 0], [7, 2, 0, 0]])
    loss = caption_loss(logits, targets, pad_index=0)
    changed = logits.clone()
    changed[0, 3] = 100 * torch.randn(len(VOCAB))
    changed[1, 2:] = 100 * torch.randn(2, len(VOCAB))
    assert torch.allclose(loss, caption_loss(changed, targets, pad_index=0))
    manual = torch.nn.functional.cross_entropy(logits[targets != 0], targets[targets != 0])
    assert torch.allclose(loss, manual)


def sequence_log_prob(decoder, features, tokens):
    """Log-probability the model gives to `tokens` (stopping after <end>), with banned tokens masked as in search."""
    inputs = torch.cat([torch.full((len(tokens), 1), SPECIAL.start), tokens[:, :-1]], dim=1)
    logits = decoder(features, inputs).float()
    logits[..., list(SPECIAL.banned)] = float("-inf")
    log_probs = torch.log_softmax(logits, dim=-1)
    mask = tokens != SPECIAL.pad
    picked = log_probs.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked)).sum(dim=1)


@KINDS
def test_greedy_is_batched_consistent_and_scores_match(kind):
    decoder, features = make_decoder(kind=kind), make_features(6, kind)
    batched = greedy_search(decoder, features, VOCAB.max_length, SPECIAL)
    single = greedy_search(decoder, features[2:3], VOCAB.max_length, SPECIAL)
    width = single.tokens.shape[1]
    assert torch.equal(batched.tokens[2, :width], single.tokens[0])
    assert torch.allclose(sequence_log_prob(decoder, features, batched.tokens), batched.log_probs, atol=1e-4)


@KINDS
def test_beam_of_one_is_greedy_and_wider_beams_never_score_lower(kind):
    for seed in range(5):
        decoder, features = make_decoder(seed, kind), make_features(16, kind)
        greedy = greedy_search(decoder, features, VOCAB.max_length, SPECIAL)
        one = beam_search(decoder, features, 1, VOCAB.max_length, SPECIAL)
        assert torch.equal(one.tokens, greedy.tokens)
        for k in (2, 4):
            beam = beam_search(decoder, features, k, VOCAB.max_length, SPECIAL)
            assert (beam.log_probs >= greedy.log_probs - 1e-5).all()
            assert torch.allclose(sequence_log_prob(decoder, features, beam.tokens), beam.log_probs, atol=1e-4)


@KINDS
def test_no_special_token_leaks_and_length_is_capped(kind):
    decoder, features = make_decoder(1, kind), make_features(32, kind)
    for result in (greedy_search(decoder, features, 5, SPECIAL), beam_search(decoder, features, 3, 5, SPECIAL)):
        assert result.tokens.shape[1] <= 6
        for row, length in zip(result.tokens.tolist(), result.lengths.tolist()):
            words = row[:length]
            assert SPECIAL.start not in words and VOCAB.unk_index not in words
            assert SPECIAL.pad not in words
            assert words.count(SPECIAL.end) <= 1 and (SPECIAL.end not in words or words[-1] == SPECIAL.end)
            assert all(token == SPECIAL.pad for token in row[length:])
        for caption in VOCAB.decode_batch(result.tokens):
            assert "<" not in caption


def test_attention_weights_sum_to_one_over_regions_and_teacher_forcing_matches_steps():
    decoder, features = make_decoder(kind="attention"), make_features(3, "attention")
    tokens = torch.randint(4, len(VOCAB), (3, 6))
    logits, weights = decoder(features, tokens, return_attention=True)
    assert logits.shape == (3, 6, len(VOCAB)) and weights.shape == (3, 6, REGIONS)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(3, 6), atol=1e-5)
    assert (weights > 0).all()  # softmax: no region is ever ignored outright
    state, stepped = decoder.init_state(features), []
    for t in range(tokens.shape[1]):
        step_logits, state = decoder.step(tokens[:, t], state)
        stepped.append(step_logits)
    assert torch.allclose(torch.stack(stepped, dim=1), logits, atol=1e-5)
    # Attention depends on the image: other regions give other weights.
    _, other = decoder(make_features(3, "attention"), tokens, return_attention=True)
    assert not torch.allclose(other, weights)


def test_attention_decoder_refuses_pooled_features():
    with pytest.raises(ValueError, match="grid features"):
        make_decoder(kind="attention").init_state(torch.randn(2, 16))


def test_doubly_stochastic_penalty_counts_real_steps_only():
    weights = torch.full((2, 4, 4), 0.25)  # 4 real steps x 1/4: every region gets exactly 1
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert doubly_stochastic_penalty(weights, mask) == pytest.approx(0.0)
    padded = torch.cat([weights, torch.rand(2, 3, 4)], dim=1)  # padding steps must not count
    assert doubly_stochastic_penalty(
        padded, torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    ) == pytest.approx(0)
    focused = torch.zeros(2, 4, 4)
    focused[..., 0] = 1.0  # all attention on one region: (1-4)^2 + 3 * 1^2 = 12
    assert doubly_stochastic_penalty(focused, mask) == pytest.approx(12.0)


def test_lstm_decoder_reads_grid_features_as_their_mean():
    decoder, grid = make_decoder(), make_features(3, "attention")
    h_grid, _ = decoder.init_state(grid)
    h_mean, _ = decoder.init_state(grid.mean(dim=1))
    assert torch.allclose(h_grid, h_mean)
