"""Every decoder through the protocol: teacher forcing equals stepping, search scores what the model says, an
image's constants serve all its beams. (The search itself has its own suite: tests/test_search.py.)"""

import pytest
import torch

from captioner.core.errors import CaptionerError
from captioner.decoding.config import DecodingConfig, ModelLimits, SpecialTokens
from captioner.decoding.search import length_normalised
from captioner.models.decoders import (
    AttentionDecoder,
    CaptionDecoder,
    GridPrefixLMDecoder,
    LSTMDecoder,
    PrefixLMDecoder,
    TransformerDecoder,
)
from captioner.models.decoders.attention import doubly_stochastic_penalty
from captioner.models.decoders.base import decoder_factory
from captioner.models.objectives import caption_cross_entropy
from captioner.models.stepping import decode_with
from captioner.text.words import Vocabulary
from tests.plugins import GRUDecoder

VOCAB = Vocabulary([f"w{i}" for i in range(20)], max_length=8)
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 32}
SPECIAL = SpecialTokens.of(VOCAB)
REGIONS = 4

BUILDERS = {
    "lstm": lambda: LSTMDecoder(len(VOCAB), feature_dim=16, embed_dim=8, hidden_dim=12, num_layers=2, dropout=0.0),
    "attention": lambda: AttentionDecoder(len(VOCAB), 16, embed_dim=8, hidden_dim=12, attention_dim=6, dropout=0.0),
    "transformer": lambda: TransformerDecoder(len(VOCAB), 16, width=16, layers=2, heads=2, dropout=0.0),
    "transformer-sinusoidal": lambda: TransformerDecoder(
        len(VOCAB), 16, width=16, layers=1, heads=4, dropout=0.0, positions="sinusoidal"
    ),
    "plugin": lambda: GRUDecoder(len(VOCAB), 16, hidden_dim=12),  # defined in tests/, not in the package
    # A small randomly initialised GPT-2 behind the two mappers; a prefix of one has an empty first cache.
    "prefix-mlp": lambda: PrefixLMDecoder(len(VOCAB), 16, lm=None, lm_config=TINY_GPT2, prefix_length=3),
    "prefix-transformer": lambda: PrefixLMDecoder(
        len(VOCAB),
        16,
        lm=None,
        lm_config=TINY_GPT2,
        prefix_length=1,
        mapper="transformer",
        mapper_layers=1,
        mapper_heads=2,
        feature_tokens=2,
    ),
    "prefix-grid": lambda: GridPrefixLMDecoder(
        len(VOCAB), 16, lm=None, lm_config=TINY_GPT2, prefix_length=2, mapper_layers=1, mapper_heads=2
    ),
}
KINDS = pytest.mark.parametrize("kind", list(BUILDERS))


def make_decoder(kind: str, seed: int = 0) -> CaptionDecoder:
    torch.manual_seed(seed)
    decoder = BUILDERS[kind]().eval()
    for module in decoder.modules():  # BatchNorm statistics as after training, not the identity
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return decoder


def make_features(batch: int, kind: str) -> torch.Tensor:
    return torch.randn(batch, REGIONS, 16) if BUILDERS[kind]().features == "grid" else torch.randn(batch, 16)


def sequence_log_prob(decoder, features, tokens, max_words=VOCAB.max_length):
    """Log-probability the model gives to `tokens` (stopping after <end>), with banned tokens masked as in search; an
    <end> after `max_words` words is the only token that step allows, and costs nothing."""
    inputs = torch.cat([torch.full((len(tokens), 1), SPECIAL.start), tokens[:, :-1]], dim=1)
    logits = decoder(features, inputs).logits.float()
    logits[..., list(SPECIAL.banned)] = float("-inf")
    log_probs = torch.log_softmax(logits, dim=-1)
    mask = tokens != SPECIAL.pad
    if tokens.shape[1] > max_words:
        mask[:, max_words] &= tokens[:, max_words] != SPECIAL.end
    picked = log_probs.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked)).sum(dim=1)


@KINDS
def test_step_by_step_logits_equal_teacher_forced_logits(kind):
    decoder, features = make_decoder(kind), make_features(3, kind)
    tokens = torch.randint(4, len(VOCAB), (3, 7))
    forced = decoder(features, tokens).logits
    assert forced.shape == (3, 7, len(VOCAB))
    context = decoder.prepare(features)
    state, stepped = decoder.initial_state(context), []
    for t in range(tokens.shape[1]):
        logits, state = decoder.step(tokens[:, t], state, context)
        stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, dim=1), forced, atol=1e-5, rtol=1e-4)


def search(decoder, features, max_words=VOCAB.max_length, special=SPECIAL, **settings):
    return decode_with(decoder, features, DecodingConfig(**settings), special, max_words)


@KINDS
def test_greedy_is_batched_consistent_and_scores_match(kind):
    decoder, features = make_decoder(kind), make_features(6, kind)
    batched = search(decoder, features, num_beams=1)
    single = search(decoder, features[2:3], num_beams=1)
    width = single.tokens.shape[-1]
    assert torch.equal(batched.best_tokens[2, :width], single.best_tokens[0])
    assert torch.allclose(sequence_log_prob(decoder, features, batched.best_tokens), batched.best_scores, atol=1e-4)


@KINDS
def test_every_beam_is_scored_with_what_the_model_gives_it(kind):
    for seed in range(2):
        decoder, features = make_decoder(kind, seed), make_features(8, kind)
        for k in (2, 4):
            beams = search(decoder, features, num_beams=k, num_return=k)
            for rank in range(k):
                model_says = sequence_log_prob(decoder, features, beams.tokens[:, rank])
                assert torch.allclose(model_says, beams.scores[:, rank], atol=1e-4)


@KINDS
def test_no_special_token_leaks_and_length_is_capped(kind):
    decoder, features = make_decoder(kind, 1), make_features(16, kind)
    for result in (search(decoder, features, 5, num_beams=1), search(decoder, features, 5, num_beams=3)):
        assert result.tokens.shape[-1] <= 6
        for row, length in zip(result.best_tokens.tolist(), result.best_lengths.tolist()):
            words = row[:length]
            assert SPECIAL.start not in words and VOCAB.unk_index not in words and SPECIAL.pad not in words
            assert words.count(SPECIAL.end) <= 1 and (SPECIAL.end not in words or words[-1] == SPECIAL.end)
            assert all(token == SPECIAL.pad for token in row[length:])


@KINDS
def test_per_image_work_done_once_gives_what_repeating_the_image_gives(kind):
    """`owners` in teacher forcing, and a context that serves an image's beams unrepeated in search."""
    decoder, features = make_decoder(kind), make_features(3, kind)
    owners = torch.tensor([0, 0, 1, 2, 2, 2])
    tokens = torch.randint(4, len(VOCAB), (6, 5))
    torch.testing.assert_close(
        decoder(features, tokens, owners=owners).logits, decoder(features[owners], tokens).logits
    )
    shared = search(decoder, features, num_beams=3, num_return=3)
    repeated_decoder = make_decoder(kind)
    repeated_decoder.expand_context = lambda context, beams: CaptionDecoder.expand(repeated_decoder, context, beams)
    repeated = search(repeated_decoder, features, num_beams=3, num_return=3)
    assert torch.equal(shared.tokens, repeated.tokens)
    torch.testing.assert_close(shared.scores, repeated.scores)


TINY = Vocabulary(["a", "b"], max_length=3)  # words 4 and 5; <end> is 2
TINY_SPECIAL = SpecialTokens.of(TINY)


def test_length_penalty_favours_the_longer_caption_as_documented():
    """Two finished captions: a short one with the higher total log-probability, a longer one with the higher
    per-word probability. Raw scores pick the short one; GNMT normalisation with alpha 1 picks the long one."""
    short, long = torch.tensor([-2.0]), torch.tensor([-2.6])
    short_len, long_len = torch.tensor([2]), torch.tensor([8])
    assert short > long
    assert length_normalised(long, long_len, 1.0) > length_normalised(short, short_len, 1.0)
    # The same choice inside beam search: a decoder that can stop after one word (p=0.6) or go on.
    decoder = FixedChoiceDecoder()
    plain = search(decoder, torch.zeros(1, 1), 6, TINY_SPECIAL, num_beams=4, length_penalty=0.0)
    favoured = search(
        decoder, torch.zeros(1, 1), 6, TINY_SPECIAL, num_beams=4, length_penalty=2.0, early_stopping="never"
    )
    assert plain.best_lengths.item() < favoured.best_lengths.item()
    assert plain.best_scores.item() > favoured.best_scores.item()  # the raw score the penalty traded for length


class FixedChoiceDecoder(CaptionDecoder):
    """After <start>: "a" (p 0.9) then <end> (p 0.5) or "b" (p 0.5); after "b": "b" until the end (p 0.97 each)."""

    def __init__(self):
        super().__init__()
        self.save_hyperparameters()

    def prepare(self, features):
        return features

    def initial_state(self, context):
        return torch.zeros(context.shape[0], dtype=torch.long)

    def step(self, tokens, state, context):
        probs = torch.full((len(tokens), len(TINY)), 1e-6)
        first, after_a, after_b = state == 0, tokens == 4, tokens == 5
        probs[first, 4], probs[first, 5] = 0.9, 0.1
        probs[after_a & ~first, TINY_SPECIAL.end], probs[after_a & ~first, 5] = 0.5, 0.5
        probs[after_b & ~first, 5], probs[after_b & ~first, TINY_SPECIAL.end] = 0.97, 0.03
        return probs.log(), state + 1


# ---------------------------------------------------------------- the Transformer's cache
def test_transformer_cached_decoding_equals_recomputing_the_prefix():
    decoder, features = make_decoder("transformer"), make_features(4, "transformer")
    cached = search(decoder, features, 10, num_beams=1)
    prefix = torch.full((4, 1), SPECIAL.start)
    for step in range(cached.tokens.shape[-1]):  # uncached: the whole prefix through the model at every step
        logits = decoder(features, prefix).logits[:, -1].float()
        logits[:, list(SPECIAL.banned)] = float("-inf")
        if step == 10:  # after 10 words only <end>, as the search's length rule allows
            logits[:, [token for token in range(logits.shape[1]) if token != SPECIAL.end]] = float("-inf")
        prefix = torch.cat([prefix, logits.argmax(-1, keepdim=True)], dim=1)
    uncached = prefix[:, 1:]
    for row, length, reference in zip(cached.best_tokens.tolist(), cached.best_lengths.tolist(), uncached.tolist()):
        assert row[:length] == reference[:length]
    state = decoder.initial_state(decoder.prepare(features))
    assert all(part.shape[2] == 0 for part in state)  # the cache starts empty and grows one position a step


def test_transformer_cross_attention_weights_are_a_distribution_over_regions():
    decoder, features = make_decoder("transformer"), make_features(2, "transformer")
    output = decoder(features, torch.randint(4, len(VOCAB), (2, 5)), return_attention=True)
    assert output.attention.shape == (2, 5, REGIONS)
    assert torch.allclose(output.attention.sum(-1), torch.ones(2, 5), atol=1e-5)
    assert decoder(features, torch.randint(4, len(VOCAB), (2, 5))).attention is None  # only on request


# ---------------------------------------------------------------- decoder specifics
def test_attention_weights_sum_to_one_over_regions_and_depend_on_the_image():
    decoder, features = make_decoder("attention"), make_features(3, "attention")
    tokens = torch.randint(4, len(VOCAB), (3, 6))
    weights = decoder(features, tokens).attention
    assert weights.shape == (3, 6, REGIONS) and torch.allclose(weights.sum(dim=-1), torch.ones(3, 6), atol=1e-5)
    assert (weights > 0).all()  # softmax: no region is ever ignored outright
    assert not torch.allclose(decoder(make_features(3, "attention"), tokens).attention, weights)


def test_doubly_stochastic_penalty_counts_real_steps_only():
    weights = torch.full((2, 4, 4), 0.25)  # 4 real steps x 1/4: every region gets exactly 1
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert doubly_stochastic_penalty(weights, mask) == pytest.approx(0.0)
    padded = torch.cat([weights, torch.rand(2, 3, 4)], dim=1)  # padding steps must not count
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    assert doubly_stochastic_penalty(padded, padded_mask) == pytest.approx(0)
    focused = torch.zeros(2, 4, 4)
    focused[..., 0] = 1.0  # all attention on one region: (1-4)^2 + 3 * 1^2 = 12
    assert doubly_stochastic_penalty(focused, mask) == pytest.approx(12.0)


def test_lstm_decoder_reads_grid_features_as_their_mean():
    decoder, grid = make_decoder("lstm"), torch.randn(3, REGIONS, 16)
    assert torch.allclose(decoder.prepare(grid), decoder.prepare(grid.mean(dim=1)))


def test_padding_does_not_count_in_the_loss():
    logits = torch.randn(2, 4, len(VOCAB))
    targets = torch.tensor([[5, 6, 2, 0], [7, 2, 0, 0]])
    loss = caption_cross_entropy(logits, targets, pad_index=0)
    changed = logits.clone()
    changed[0, 3] = 100 * torch.randn(len(VOCAB))
    changed[1, 2:] = 100 * torch.randn(2, len(VOCAB))
    assert torch.allclose(loss, caption_cross_entropy(changed, targets, pad_index=0))
    manual = torch.nn.functional.cross_entropy(logits[targets != 0], targets[targets != 0])
    assert torch.allclose(loss, manual)
    smoothed = caption_cross_entropy(logits, targets, pad_index=0, label_smoothing=0.1)
    log_probs = torch.log_softmax(logits[targets != 0], dim=-1)
    expected = 0.9 * manual - 0.1 * log_probs.mean(dim=-1).mean()
    assert torch.allclose(smoothed, expected, atol=1e-6)


@KINDS
def test_a_spec_rebuilds_the_same_decoder(kind, monkeypatch):
    monkeypatch.setenv("CAPTIONER_ALLOW_MODULES", "tests")  # the plugin decoder lives in tests/
    decoder = make_decoder(kind)
    spec = decoder.spec()
    assert "vocab_size" not in spec["init_args"] and "feature_dim" not in spec["init_args"]
    rebuilt = decoder_factory(spec)(len(VOCAB), 16)
    assert type(rebuilt) is type(decoder) and rebuilt.spec() == spec
    assert rebuilt.state_dict().keys() == decoder.state_dict().keys()


@KINDS
def test_a_decoder_writes_up_to_its_limit_and_settings_past_it_are_refused_before_it_runs(kind):
    decoder, features = make_decoder(kind), make_features(2, kind)
    longest = decoder.longest_caption()
    if longest is None:  # recurrent decoders: nothing bounds a caption
        assert kind in ("lstm", "attention", "plugin")
        return
    limits = ModelLimits(len(VOCAB), VOCAB.max_length, longest, type(decoder).__name__, VOCAB.stoi)

    def forced(words: int):  # no <end> before `words` words: the search takes every step it may
        config = DecodingConfig(num_beams=2, max_length=words, min_length=words)
        return config, decode_with(decoder, features, config, SPECIAL, words)

    config, decoded = forced(longest)
    config.checked(limits)
    assert int(decoded.lengths.min()) >= longest  # as long as the decoder allows, and it ran
    with pytest.raises(CaptionerError, match=f"writes at most {longest} words"):
        DecodingConfig(max_length=longest + 1).checked(limits)
    with pytest.raises((ValueError, IndexError, RuntimeError)):  # the limit is tight: one word more breaks it
        forced(longest + 1)
