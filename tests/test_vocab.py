import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from captioner.core.errors import CaptionerError
from captioner.text.words import SPECIAL_TOKENS, Vocabulary, normalize


def test_normalize_lowercases_and_strips_punctuation():
    assert normalize("A man's T-shirt, on the  BEACH!") == ["a", "mans", "t", "shirt", "on", "the", "beach"]
    assert normalize("Café: crème_brûlée") == ["café", "crème", "brûlée"]


def test_build_counts_only_frequent_words_and_orders_deterministically():
    vocab = Vocabulary.build(["a dog", "a cat", "a dog runs", "zebra"], min_count=2)
    assert vocab.itos[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert vocab.itos[len(SPECIAL_TOKENS) :] == ["a", "dog"]
    assert vocab.encode("A dog flies") == [
        vocab.start_index,
        vocab.stoi["a"],
        vocab.stoi["dog"],
        vocab.unk_index,
        vocab.end_index,
    ]


def test_encode_batch_pads_and_truncates_to_max_length():
    vocab = Vocabulary.build(["one two three four five"], min_count=1, max_length=3)
    batch = vocab.encode_batch(["one two three four five", "one"])
    assert batch.shape == (2, 5)
    assert batch[0].tolist() == [1, vocab.stoi["one"], vocab.stoi["two"], vocab.stoi["three"], 2]
    assert batch[1].tolist() == [1, vocab.stoi["one"], 2, 0, 0]


def test_decode_stops_at_end_and_skips_specials():
    vocab = Vocabulary.build(["red circle"], min_count=1)
    ids = torch.tensor([[1, vocab.stoi["red"], 0, vocab.stoi["circle"], 2, vocab.stoi["red"]]])
    assert vocab.decode_batch(ids) == ["red circle"]


def test_save_load_round_trip_and_validation(tmp_path):
    vocab = Vocabulary.build(["a red circle", "a blue square"], min_count=1, max_length=12)
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.max_length == 12
    (tmp_path / "bad.json").write_text('{"version": 1, "words": []}')
    with pytest.raises(CaptionerError, match="max_length"):
        Vocabulary.load(tmp_path / "bad.json")


@given(st.text())
def test_normalize_is_idempotent_on_any_unicode(text):
    words = normalize(text)
    assert normalize(" ".join(words)) == words
    assert all(word and not any(ch.isspace() or ch in ".,!?'-_" for ch in word) for word in words)


@given(st.lists(st.text(min_size=1), min_size=1, max_size=8))
def test_encode_decode_round_trip_on_any_unicode(captions):
    vocab = Vocabulary.build(captions, min_count=1, max_length=1000)
    for caption in captions:
        assert vocab.decode(vocab.encode(caption)) == " ".join(normalize(caption))
