"""Decoding users can hold to, on both backends of the one search (PyTorch tensors, the runtime's NumPy): forced words
and phrases (any one of a set, too) in every caption when they fit, prefixes, banned phrases, exact lengths; the
constrained beam, wide enough, finds what an exhaustive search over every caption finds; an impossible constraint
answers, marked, instead of hanging."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from captioner.decoding.config import DecodingConfig, ModelLimits, SpecialTokens
from captioner.decoding.ops import NumpyOps
from captioner.decoding.search import decode, length_normalised
from captioner.decoding.torch_ops import TorchOps
from captioner.errors import CaptionerError
from captioner.models.decoders import LSTMDecoder, TransformerDecoder
from captioner.models.stepping import DecoderStepper
from captioner.text.words import Vocabulary
from tests.test_search import NumpyStepper, caption_log_prob

WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "of", "and", "small"]
VOCAB = Vocabulary(WORDS, max_length=8)
SPECIAL = SpecialTokens.of(VOCAB)
TINY = Vocabulary(["x", "y", "z"], max_length=3)
TINY_SPECIAL = SpecialTokens.of(TINY)
BACKENDS = pytest.mark.parametrize("backend", ["torch", "numpy"])


def lstm(vocabulary: Vocabulary = VOCAB, seed: int = 0) -> LSTMDecoder:
    torch.manual_seed(seed)
    decoder = LSTMDecoder(len(vocabulary), 8, embed_dim=8, hidden_dim=16, dropout=0.0).eval()
    with torch.no_grad():
        decoder.head.weight.mul_(3.0)
    return decoder


def run(
    backend: str,
    decoder,
    features: torch.Tensor,
    config: DecodingConfig,
    vocabulary: Vocabulary = VOCAB,
    max_words: int = 8,
):
    """Ranked captions (token lists without padding), scores and met flags, from one backend."""
    special = SpecialTokens.of(vocabulary)
    max_words = config.max_words(max_words)  # the caption's own max_length, else the vocabulary's
    with torch.no_grad():
        if backend == "torch":
            out = decode(
                DecoderStepper(decoder, features),
                len(features),
                config,
                special,
                TorchOps("cpu"),
                max_words,
                vocabulary,
            )
            tokens, lengths, scores = out.tokens.numpy(), out.lengths.numpy(), out.scores.numpy()
            met = None if out.met is None else out.met.numpy()
        else:
            out = decode(
                NumpyStepper(decoder, features), len(features), config, special, NumpyOps(), max_words, vocabulary
            )
            tokens, lengths, scores, met = out.tokens, out.lengths, out.scores, out.met
    captions = [[tokens[i, r, : lengths[i, r]].tolist() for r in range(tokens.shape[1])] for i in range(len(tokens))]
    return captions, scores, met


def words_of(caption: list[int], vocabulary: Vocabulary = VOCAB) -> list[str]:
    return [vocabulary.itos[token] for token in caption if token != vocabulary.end_index]


@BACKENDS
def test_forced_words_and_phrases_are_in_every_returned_caption(backend):
    decoder, features = lstm(), torch.randn(6, 8)
    plain = run(backend, decoder, features, DecodingConfig(num_beams=4, num_return=4))[0]
    assert sum("square" in words_of(c) for image in plain for c in image) < 12  # not what it writes anyway
    config = DecodingConfig(num_beams=4, num_return=4, force_words=("square", "on the left", ("red", "blue")))
    captions, scores, met = run(backend, decoder, features, config)
    assert met.all()
    for image in captions:
        for caption in image:
            text = " ".join(words_of(caption))
            assert "square" in text.split() and "on the left" in text and ({"red", "blue"} & set(text.split()))
    for image_scores in scores:  # ranked best first
        assert list(image_scores) == sorted(image_scores, reverse=True)


@BACKENDS
def test_a_beam_wide_enough_finds_the_best_caption_that_meets_the_constraint(backend):
    """Over every caption of up to 3 words of {x, y, z} holding "y z" or "x": the one the model scores best."""
    decoder, features = lstm(TINY, seed=2), torch.randn(4, 8)
    words = [TINY.stoi[w] for w in ("x", "y", "z")]
    config = DecodingConfig(num_beams=40, force_words=(("y z", "x"),), early_stopping="never", length_penalty=1.0)
    captions, scores, met = run(backend, decoder, features, config, TINY, max_words=3)
    y, z, x = TINY.stoi["y"], TINY.stoi["z"], TINY.stoi["x"]

    def meets(prefix) -> bool:
        return x in prefix or any(prefix[i : i + 2] == (y, z) for i in range(len(prefix) - 1))

    candidates = [
        [*prefix, TINY_SPECIAL.end] for n in range(4) for prefix in itertools.product(words, repeat=n) if meets(prefix)
    ]
    for image in range(len(features)):
        with torch.no_grad():
            best = max(
                candidates,
                key=lambda c: length_normalised(
                    caption_log_prob(decoder, features[image : image + 1], c, TINY_SPECIAL, 3), len(c), 1.0
                ),
            )
        assert captions[image][0] == best and met[image, 0]
        expected = caption_log_prob(decoder, features[image : image + 1], best, TINY_SPECIAL, 3)
        assert scores[image, 0] == pytest.approx(expected, abs=1e-4)


@BACKENDS
def test_prefixes_banned_phrases_and_exact_lengths_hold_in_every_caption(backend):
    decoder, features = lstm(seed=1), torch.randn(8, 8)
    config = DecodingConfig(
        num_beams=3, num_return=3, prefix="a small", bad_words=("red", "the left"), min_length=5, max_length=5
    )
    captions, _, met = run(backend, decoder, features, config)
    assert met is None
    for image in captions:
        for caption in image:
            words = words_of(caption)
            assert words[:2] == ["a", "small"] and len(words) == 5 and caption[-1] == VOCAB.end_index
            assert "red" not in words and "the left" not in " ".join(words)
    greedy = run(backend, decoder, features, DecodingConfig(num_beams=1, max_length=2))[0]
    assert all(len(words_of(image[0])) <= 2 for image in greedy)


@BACKENDS
def test_a_constraint_no_caption_can_meet_in_time_gives_the_best_caption_marked(backend):
    decoder, features = lstm(), torch.randn(3, 8)
    config = DecodingConfig(num_beams=2, num_return=2, force_words=("red", "blue", "circle"), max_length=2)
    captions, scores, met = run(backend, decoder, features, config)
    assert not met.any() and np.isfinite(scores).all()
    assert all(len(words_of(caption)) <= 2 for image in captions for caption in image)


def test_both_backends_search_the_constraints_alike():
    decoder = TransformerDecoder(len(VOCAB), 8, width=16, layers=1, heads=2, dropout=0.0).eval()
    features = torch.randn(5, 3, 8)
    config = DecodingConfig(
        num_beams=4, num_return=4, force_words=(("circle", "square"), "left"), bad_words=("the the",), prefix="a"
    )
    ours, theirs = run("torch", decoder, features, config), run("numpy", decoder, features, config)
    assert ours[0] == theirs[0] and (ours[2] == theirs[2]).all()
    np.testing.assert_allclose(ours[1], theirs[1], atol=1e-4)


def test_phrases_the_tokenizer_cannot_write_are_refused_naming_them():
    limits = ModelLimits(len(VOCAB), 8, None, "LSTMDecoder", VOCAB.stoi, VOCAB)
    with pytest.raises(CaptionerError, match="'a purple', 'zebra': not in this model's vocabulary"):
        DecodingConfig(force_words=("zebra",), bad_words=("a purple",)).checked(limits)
    with pytest.raises(CaptionerError, match="longer than the 3 tokens"):
        DecodingConfig(prefix="a small red circle", max_length=3).checked(limits)
    with pytest.raises(CaptionerError, match="force_words with sampling"):
        DecodingConfig(num_beams=1, do_sample=True, force_words=("red",))
    DecodingConfig(num_beams=2, force_words=("red", ["circle", "square"]), prefix="a").checked(limits)


def test_a_met_constraint_ranks_above_any_partial_match_of_its_longer_alternatives():
    """Dynamic beam allocation deals beams by forced tokens written: having written "red" (one token) must count
    more than being two tokens into "dark blue sky" (else the met hypothesis competes with, and can lose to, ones
    that never finish the phrase, as a BPE word of several pieces did)."""
    from captioner.decoding.constrained import _Progress

    progress = _Progress([[(5,), (1, 2, 3)]])
    start = ((0, 0), (False,))
    met = progress.advance(*start, 5)
    partial = progress.advance(*progress.advance(*start, 1), 2)
    assert met[1] == (True,) and partial == ((0, 2), (False,))
    assert progress.bank(*met) > progress.bank(*partial) > progress.bank(*start)


@BACKENDS
def test_an_exact_length_with_bad_endings_still_ends_every_caption(backend):
    """The caption's last word cannot be a bad ending when the length leaves no word after it: every image gets
    finished captions, none ending on one (the search once returned none, and the server's answer broke)."""
    decoder, features = lstm(seed=4), torch.randn(8, 8)
    endings = tuple(word for word in WORDS if word not in ("circle", "square"))
    config = DecodingConfig(
        num_beams=3, num_return=3, bad_endings=endings, min_length=3, max_length=3, no_repeat_ngram_size=2
    )
    captions, scores, _ = run(backend, decoder, features, config)
    assert np.isfinite(scores).all()
    for image in captions:
        for caption in image:
            words = words_of(caption)
            assert len(words) == 3 and words[-1] in ("circle", "square")
