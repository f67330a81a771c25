import torch

from captioner.data.vocab import Vocabulary
from captioner.models.decoder import CaptionDecoder, caption_loss
from captioner.models.search import SpecialTokens, beam_search, greedy_search

VOCAB = Vocabulary([f"w{i}" for i in range(20)], max_length=8)
SPECIAL = SpecialTokens.of(VOCAB)


def make_decoder(seed=0):
    torch.manual_seed(seed)
    decoder = CaptionDecoder(len(VOCAB), feature_dim=16, embed_dim=8, hidden_dim=12, num_layers=2, dropout=0.0)
    decoder.eval()
    return decoder


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


def test_greedy_is_batched_consistent_and_scores_match():
    decoder, features = make_decoder(), torch.randn(6, 16)
    batched = greedy_search(decoder, features, VOCAB.max_length, SPECIAL)
    single = greedy_search(decoder, features[2:3], VOCAB.max_length, SPECIAL)
    width = single.tokens.shape[1]
    assert torch.equal(batched.tokens[2, :width], single.tokens[0])
    assert torch.allclose(sequence_log_prob(decoder, features, batched.tokens), batched.log_probs, atol=1e-4)


def test_beam_of_one_is_greedy_and_wider_beams_never_score_lower():
    for seed in range(5):
        decoder, features = make_decoder(seed), torch.randn(16, 16)
        greedy = greedy_search(decoder, features, VOCAB.max_length, SPECIAL)
        one = beam_search(decoder, features, 1, VOCAB.max_length, SPECIAL)
        assert torch.equal(one.tokens, greedy.tokens)
        for k in (2, 4):
            beam = beam_search(decoder, features, k, VOCAB.max_length, SPECIAL)
            assert (beam.log_probs >= greedy.log_probs - 1e-5).all()
            assert torch.allclose(sequence_log_prob(decoder, features, beam.tokens), beam.log_probs, atol=1e-4)


def test_no_special_token_leaks_and_length_is_capped():
    decoder, features = make_decoder(1), torch.randn(32, 16)
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
