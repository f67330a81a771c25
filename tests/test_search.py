"""One conformance suite for the one search, run twice: over torch tensors (the PyTorch captioner) and over NumPy
arrays (the exported runtime), each through a step function over the same decoder, without ONNX."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch

from captioner.decoding.config import DecodingConfig, SpecialTokens
from captioner.decoding.ops import NumpyOps
from captioner.decoding.search import decode, length_normalised
from captioner.decoding.torch_ops import TorchOps
from captioner.models.decoders import CaptionDecoder, LSTMDecoder, PrefixLMDecoder, TransformerDecoder
from captioner.models.stepping import DecoderStepper
from captioner.text.words import Vocabulary

VOCAB = Vocabulary([f"w{i}" for i in range(12)], max_length=6)
SPECIAL = SpecialTokens.of(VOCAB)
TINY = Vocabulary(["x", "y"], max_length=3)  # two words: every caption of up to 3 words can be listed
TINY_SPECIAL = SpecialTokens.of(TINY)


class NumpyStepper:
    """The same decoder seen as the runtime sees its graphs: NumPy tokens in, NumPy logits out."""

    def __init__(self, decoder: CaptionDecoder, features: torch.Tensor) -> None:
        self.inner = DecoderStepper(decoder, features)

    def start(self, copies):
        return self.inner.start(copies)

    def step(self, tokens, state):
        logits, state = self.inner.step(torch.as_tensor(tokens), state)
        return logits.detach().numpy(), state

    def reorder(self, state, rows):
        return self.inner.reorder(state, torch.as_tensor(rows))


def run(
    backend: str,
    decoder: CaptionDecoder,
    features: torch.Tensor,
    config: DecodingConfig,
    special: SpecialTokens = SPECIAL,
    max_words: int = 6,
    vocabulary: Vocabulary = VOCAB,
):
    """Decode with one backend; tokens, scores and lengths as NumPy arrays."""
    with torch.no_grad():
        if backend == "torch":
            ops = TorchOps("cpu")
            out = decode(
                DecoderStepper(decoder, features), len(features), config, special, ops, max_words, vocabulary.stoi
            )
            return out.tokens.numpy(), out.scores.numpy(), out.lengths.numpy()
        out = decode(
            NumpyStepper(decoder, features), len(features), config, special, NumpyOps(), max_words, vocabulary.stoi
        )
        return out.tokens, out.scores, out.lengths


BACKENDS = pytest.mark.parametrize("backend", ["torch", "numpy"])


def lstm(vocabulary: Vocabulary = VOCAB, sharpen: float = 4.0, seed: int = 0) -> LSTMDecoder:
    torch.manual_seed(seed)
    decoder = LSTMDecoder(len(vocabulary), 8, embed_dim=8, hidden_dim=8, dropout=0.0).eval()
    with torch.no_grad():
        decoder.head.weight.mul_(sharpen)  # peaked distributions: captions differ clearly in score
    return decoder


def transformer(vocabulary: Vocabulary = VOCAB, seed: int = 0) -> TransformerDecoder:
    torch.manual_seed(seed)
    decoder = TransformerDecoder(len(vocabulary), 8, width=8, layers=1, heads=2, dropout=0.0).eval()
    with torch.no_grad():
        decoder.head.weight.mul_(6)
    return decoder


def prefix_lm(vocabulary: Vocabulary = VOCAB, seed: int = 0) -> PrefixLMDecoder:
    torch.manual_seed(seed)
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 16}
    decoder = PrefixLMDecoder(len(vocabulary), 8, lm=None, lm_config=config, prefix_length=2).eval()
    with torch.no_grad():
        decoder.lm.get_output_embeddings().weight.mul_(6)
    return decoder


def caption_log_prob(
    decoder: CaptionDecoder,
    features: torch.Tensor,
    caption: list[int],
    special: SpecialTokens,
    max_words: int | None = None,
):
    """The model's log-probability of one caption with the never-generated tokens banned, as search scores it: a
    caption of `max_words` words gets its `<end>` for nothing (the only token the step after them allows)."""
    tokens = torch.tensor([caption])
    inputs = torch.cat([torch.tensor([[special.start]]), tokens[:, :-1]], dim=1)
    logits = decoder(features, inputs).logits.float()
    logits[..., list(special.banned)] = float("-inf")
    picked = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)[0]
    if max_words is not None and len(caption) == max_words + 1:
        picked = picked[:-1]
    return float(picked.sum())


# ---------------------------------------------------------------- exactness
@BACKENDS
@pytest.mark.parametrize("make", [lstm, transformer, prefix_lm], ids=["lstm", "transformer", "prefix-lm"])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_a_beam_wide_enough_is_exhaustive_search(backend, make, length_penalty):
    decoder, words = make(TINY), [4, 5]
    features = torch.randn(5, 2, 8) if make is transformer else torch.randn(5, 8)
    # Every caption of up to 3 words: the step after 3 words can only be <end>, so none is cut off without one.
    candidates = [[*prefix, TINY_SPECIAL.end] for n in range(4) for prefix in itertools.product(words, repeat=n)]
    config = DecodingConfig(num_beams=16, length_penalty=length_penalty, early_stopping="never")
    tokens, scores, lengths = run(backend, decoder, features, config, TINY_SPECIAL, max_words=3, vocabulary=TINY)
    for image in range(len(features)):
        with torch.no_grad():
            scored = sorted(
                (
                    (
                        length_normalised(
                            caption_log_prob(decoder, features[image : image + 1], c, TINY_SPECIAL, 3),
                            len(c),
                            length_penalty,
                        ),
                        c,
                    )
                    for c in candidates
                ),
                reverse=True,
            )
        assert tokens[image, 0, : lengths[image, 0]].tolist() == scored[0][1], (image, scored[:3])
        best = caption_log_prob(decoder, features[image : image + 1], scored[0][1], TINY_SPECIAL, 3)
        assert scores[image, 0] == pytest.approx(best, abs=1e-4)


@BACKENDS
def test_max_length_is_exact_a_caption_that_would_go_on_ends_there(backend):
    """`max_length` 4 gives at most 4 words: a model that (almost) never ends writes 4 words and <end>."""
    decoder = lstm()
    with torch.no_grad():
        decoder.head.bias[SPECIAL.end] = -50.0  # <end> (almost) never chosen
    features = torch.randn(3, 8)
    for config in (DecodingConfig(num_beams=1), DecodingConfig(num_beams=3, length_penalty=0.6)):
        tokens, scores, lengths = run(backend, decoder, features, config, max_words=4)
        assert (lengths[:, 0] == 5).all() and tokens.shape[-1] == 5 and (tokens[:, 0, 4] == SPECIAL.end).all()
        assert SPECIAL.end not in tokens[:, 0, :4].flatten().tolist()
        for image in range(3):
            expected = caption_log_prob(decoder, features[image : image + 1], tokens[image, 0].tolist(), SPECIAL, 4)
            assert scores[image, 0] == pytest.approx(expected, abs=1e-4)


@BACKENDS
def test_beams_are_ranked_and_one_beam_is_greedy(backend):
    decoder, features = lstm(sharpen=2.0), torch.randn(6, 8)
    greedy = run(backend, decoder, features, DecodingConfig(num_beams=1))
    tokens, scores, lengths = run(backend, decoder, features, DecodingConfig(num_beams=4, length_penalty=0.5))
    normalised = length_normalised(scores, lengths, 0.5)
    assert tokens.shape[:2] == (6, 4) and (normalised[:, :-1] >= normalised[:, 1:] - 1e-6).all()
    assert np.isfinite(scores).all()
    # Greedy picks the best word every step; its score is the sum of what it picked.
    for image in range(6):
        caption = greedy[0][image, 0, : greedy[2][image, 0]].tolist()
        assert greedy[1][image, 0] == pytest.approx(
            caption_log_prob(decoder, features[image : image + 1], caption, SPECIAL, 6), abs=1e-4
        )


@BACKENDS
def test_greedy_decoding_draws_no_random_streams(backend, monkeypatch):
    """A random generator per image is sampling's alone: built for greedy batches, it cost the host more than an
    H200's whole greedy search of a batch of 1,024 (greedy ran at 0.35x captioner 0.2's rate there)."""
    from captioner.decoding import search

    decoder, features = lstm(sharpen=2.0), torch.randn(5, 8)
    expected = run(backend, decoder, features, DecodingConfig(num_beams=1))

    def refused(*args, **kwargs):
        raise AssertionError("greedy decoding built sampling's per-image streams")

    monkeypatch.setattr(search, "RowStreams", refused)
    again = run(backend, decoder, features, DecodingConfig(num_beams=1))
    assert again[0].tolist() == expected[0].tolist()
    with pytest.raises(AssertionError, match="per-image streams"):  # sampling still draws them
        run(backend, decoder, features, DecodingConfig(num_beams=1, do_sample=True, seed=3))


def test_each_images_random_stream_is_its_own_uniform_and_reproducible():
    """Sampling's streams: an image's numbers depend on the seed and its place alone (not its batch-mates), differ
    between places and seeds, and are uniform on [0, 1)."""
    from captioner.decoding.search import RowStreams

    streams = RowStreams(7, list(range(2048)))
    draws = np.stack([streams.uniforms() for _ in range(32)])  # (draw, image)
    assert draws.min() >= 0.0 and draws.max() < 1.0
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.std() - (1 / 12) ** 0.5) < 0.01
    assert np.histogram(draws, bins=10, range=(0, 1))[0].min() > 0.09 * draws.size  # no bin starved
    assert abs(np.corrcoef(draws[:, :-1].ravel(), draws[:, 1:].ravel())[0, 1]) < 0.02  # neighbours unrelated
    again = RowStreams(7, [1500, 3, 3])  # other batch-mates, another order, a place twice
    for step in range(3):
        assert again.uniforms().tolist() == draws[step, [1500, 3, 3]].tolist()
    assert RowStreams(8, [3]).uniforms()[0] != draws[0, 3]  # another seed, another stream
    assert RowStreams(None, [3]).uniforms()[0] != RowStreams(None, [3]).uniforms()[0]  # no seed: fresh each call


@BACKENDS
def test_a_batch_decodes_each_image_as_it_would_alone(backend):
    decoder, features = transformer(), torch.randn(4, 3, 8)
    config = DecodingConfig(num_beams=3, length_penalty=0.7, no_repeat_ngram_size=2)
    together = run(backend, decoder, features, config)
    for image in range(4):
        alone = run(backend, decoder, features[image : image + 1], config)
        width = alone[0].shape[-1]
        assert together[0][image, :, :width].tolist() == alone[0][0].tolist()
        np.testing.assert_allclose(together[1][image], alone[1][0], atol=1e-4)


# ---------------------------------------------------------------- the rules
@BACKENDS
def test_the_rules_hold_in_every_caption(backend):
    decoder, features = lstm(sharpen=1.0, seed=2), torch.randn(16, 8)
    with torch.no_grad():
        decoder.head.bias[SPECIAL.end] = 2.0  # captions end early unless a rule stops them
        decoder.head.bias[VOCAB.stoi["w0"]] = 2.0  # and "w0" is likely, often twice, often last
    bad = ("w0", "w1", "w2")
    config = DecodingConfig(num_beams=3, num_return=3, min_length=3, no_repeat_ngram_size=2, bad_endings=bad)
    plain_tokens = run(backend, decoder, features, DecodingConfig(num_beams=3, num_return=3))[0]
    tokens, scores, lengths = run(backend, decoder, features, config)
    bad_ids = {VOCAB.stoi[word] for word in bad}
    checked = 0
    for image, rank in itertools.product(range(16), range(3)):
        caption = tokens[image, rank, : lengths[image, rank]].tolist()
        words = caption[:-1] if caption[-1] == SPECIAL.end else caption
        assert not set(caption) & set(SPECIAL.banned)
        assert len(words) >= 3  # min_length
        bigrams = list(zip(words, words[1:]))
        assert len(bigrams) == len(set(bigrams))  # no_repeat_ngram_size
        if caption[-1] == SPECIAL.end:
            assert words[-1] not in bad_ids  # bad_endings
            checked += 1
    assert checked > 10
    assert not np.array_equal(plain_tokens, tokens)  # the rules changed what was decoded


@BACKENDS
def test_diverse_groups_start_differently(backend):
    decoder, features = lstm(sharpen=1.0, seed=4), torch.randn(8, 8)
    plain = run(backend, decoder, features, DecodingConfig(num_beams=4, num_return=4))[0]
    diverse = run(
        backend,
        decoder,
        features,
        DecodingConfig(num_beams=4, num_return=4, num_beam_groups=4, diversity_penalty=100.0),
    )[0]
    distinct = lambda tokens: np.mean([len({tuple(r[:1]) for r in image}) for image in tokens])  # noqa: E731
    assert distinct(diverse) == 4 and distinct(plain) < 4  # each group's first word, different from the others'


# ---------------------------------------------------------------- sampling
@BACKENDS
def test_sampling_draws_words_as_often_as_the_model_says(backend):
    decoder, features = lstm(sharpen=0.6, seed=5), torch.zeros(1, 8)
    with torch.no_grad():
        logits, _ = DecoderStepper(decoder, features).step(
            torch.tensor([SPECIAL.start]), DecoderStepper(decoder, features).start(1)
        )
        logits[0, list(SPECIAL.banned)] = float("-inf")
        expected = torch.softmax(logits[0], -1).numpy()
    draws = 4000
    tokens = run(
        backend, decoder, features.expand(draws, 8), DecodingConfig(num_beams=1, do_sample=True, seed=3), max_words=1
    )[0]
    counts = Counter(tokens[:, 0, 0].tolist())
    observed = np.array([counts.get(i, 0) for i in range(len(VOCAB))]) / draws
    assert np.abs(observed - expected).max() < 4 * math.sqrt(0.25 / draws)  # within 4 standard errors
    assert not counts.keys() & set(SPECIAL.banned)
    for k in (1, 3):  # top-k: only the k most likely words, and all of them
        top = set(np.argsort(-expected)[:k].tolist())
        sampled = run(
            backend,
            decoder,
            features.expand(400, 8),
            DecodingConfig(num_beams=1, do_sample=True, top_k=k, seed=1),
            max_words=1,
        )[0]
        assert set(sampled[:, 0, 0].tolist()) == top
    order = np.argsort(-expected)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(expected[order]), 0.5)) + 1].tolist())
    sampled = run(
        backend,
        decoder,
        features.expand(400, 8),
        DecodingConfig(num_beams=1, do_sample=True, top_p=0.5, seed=2),
        max_words=1,
    )[0]
    assert set(sampled[:, 0, 0].tolist()) == nucleus
    again = run(
        backend,
        decoder,
        features.expand(400, 8),
        DecodingConfig(num_beams=1, do_sample=True, top_p=0.5, seed=2),
        max_words=1,
    )[0]
    assert np.array_equal(sampled, again)  # a seed gives the same draws


# ---------------------------------------------------------------- the two backends agree
@pytest.mark.parametrize(
    "config",
    [
        DecodingConfig(num_beams=1),
        DecodingConfig(num_beams=5, length_penalty=0.6, num_return=5),
        DecodingConfig(num_beams=3, min_length=2, no_repeat_ngram_size=2, bad_endings=("w3",), early_stopping=True),
        DecodingConfig(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return=4),
        DecodingConfig(num_beams=1, do_sample=True, temperature=0.9, top_p=0.8, seed=7),
        DecodingConfig(num_beams=1, do_sample=True, temperature=1.5, top_k=5, seed=11),
    ],
    ids=["greedy", "beam5-lp", "rules", "diverse", "sampled-top-p", "sampled-top-k"],
)
def test_torch_and_numpy_decode_the_same_captions_with_the_same_scores(config):
    decoder, features = transformer(seed=7), torch.randn(12, 3, 8)
    ours, theirs = run("torch", decoder, features, config), run("numpy", decoder, features, config)
    assert ours[0].tolist() == theirs[0].tolist()
    np.testing.assert_array_equal(ours[2], theirs[2])
    np.testing.assert_allclose(ours[1], theirs[1], atol=1e-4)


@BACKENDS
def test_a_sampled_caption_depends_on_the_seed_and_its_place_not_on_its_batch_mates(backend):
    """Each image draws from a stream seeded by the seed and its place: alone, or among others in any order, an image
    samples the same caption; another seed, or another place, draws others."""
    decoder, features = lstm(sharpen=0.5, seed=3), torch.randn(16, 8)
    config = DecodingConfig(num_beams=1, do_sample=True, temperature=1.5, seed=5)
    places = [1000 + 7 * i for i in range(16)]
    together = run_at(backend, decoder, features, config, places)
    order = list(range(15, -1, -1))
    shuffled = run_at(backend, decoder, features[order], config, [places[i] for i in order])
    assert shuffled[::-1] == together
    for image in (0, 9):
        assert run_at(backend, decoder, features[image : image + 1], config, [places[image]]) == [together[image]]
    other_seed = run_at(backend, decoder, features, DecodingConfig(**{**config.to_dict(), "seed": 6}), places)
    assert other_seed != together and len(set(map(tuple, together))) > 8  # drawn, not searched


def run_at(
    backend: str, decoder: CaptionDecoder, features: torch.Tensor, config: DecodingConfig, places: list[int]
) -> list[list[int]]:
    """Sampled tokens of each image (without padding), its stream seeded by its place."""
    with torch.no_grad():
        if backend == "torch":
            out = decode(
                DecoderStepper(decoder, features),
                len(features),
                config,
                SPECIAL,
                TorchOps("cpu"),
                6,
                VOCAB.stoi,
                places,
            )
            rows = out.tokens[:, 0].tolist()
        else:
            out = decode(
                NumpyStepper(decoder, features), len(features), config, SPECIAL, NumpyOps(), 6, VOCAB.stoi, places
            )
            rows = out.tokens[:, 0].tolist()
    return [[token for token in row if token != SPECIAL.pad] for row in rows]


def test_a_compiled_search_pads_the_batch_and_gives_the_same_captions(monkeypatch):
    """The compiled path's logic on the CPU (the compilation itself swapped for the plain step: compiling takes
    tens of seconds here; tests/test_gpu.py runs it for real): the batch padded to a few sizes, the padding
    dropped."""
    from captioner.models import stepping as torch_search

    assert [torch_search.padded_rows(n) for n in (1, 8, 9, 100)] == [8, 8, 16, 128]
    monkeypatch.setattr(torch_search, "compiled_step", lambda decoder: decoder.step)
    decoder, features = transformer(seed=3), torch.randn(5, 3, 8)
    config = DecodingConfig(num_beams=3, num_return=3)
    plain = torch_search.decode_with(decoder, features, config, SPECIAL, 6)
    padded = torch_search.decode_with(decoder, features, config, SPECIAL, 6, compiled=True)
    assert padded.tokens.shape[0] == 5 and torch.equal(plain.tokens, padded.tokens)
    torch.testing.assert_close(plain.scores, padded.scores)


@pytest.mark.parametrize("shape, k", [((6, 15000), 6), ((3, 2, 5003), 3), ((4, 700), 5), ((2, 9), 3)])
def test_numpy_top_k_is_the_stable_sorts_head_on_ties_and_minus_infinity_too(shape, k):
    """The runtime's top-k (by blocks on a long axis) returns exactly what a full stable sort's first k are."""
    rng = np.random.default_rng(sum(shape) + k)
    for trial in range(12):
        values = rng.standard_normal(shape).astype(np.float32)
        if trial % 3 == 0:
            values = np.round(values, 1)  # many ties, across blocks
        if trial % 4 == 1:
            values[..., ::2] = -np.inf  # banned tokens
        if trial % 5 == 2:
            values[..., -1] = 100.0  # the best in the last, shorter block
        if trial == 7:
            values[:] = -np.inf
        top, index = NumpyOps().topk(values, k)
        expected = np.argsort(-values, axis=-1, kind="stable")[..., :k]
        assert np.array_equal(index, expected), trial
        assert np.array_equal(top, np.take_along_axis(values, expected, axis=-1))
