"""The text side as parts: word vocabulary, BPE trained on the captions, a pretrained tokenizer; saved, read back
torch-free, scored over words."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from captioner.core.errors import CaptionerError
from captioner.data.synthetic import describe_scene, random_scene
from captioner.evaluation.cider import CiderD
from captioner.text import Bpe, Pretrained, SubwordTokenizer, Vocabulary, Words, normalize, tokenizer_from_dict
from tests.conftest import tiny_args, write_gpt2_like_tokenizer


@pytest.fixture(scope="module")
def scene_captions() -> list[str]:
    rng = random.Random(0)
    return [caption for _ in range(150) for caption in describe_scene(random_scene(rng), rng)]


@pytest.fixture(scope="module")
def bpe(scene_captions) -> SubwordTokenizer:
    return Bpe(vocab_size=400, max_tokens=40).build(scene_captions, max_length=34)


def test_bpe_round_trips_every_demo_caption_and_never_needs_unk(bpe, scene_captions):
    assert 300 < len(bpe) <= 400  # the demo's words are all merged before 400
    for caption in scene_captions:
        ids = bpe.encode(caption)
        assert ids[0] == bpe.start_index and ids[-1] == bpe.end_index
        assert bpe.decode(ids) == " ".join(normalize(caption))
    # Byte-level: a word never seen in training still comes back as written, in pieces.
    unseen = bpe.encode("a zebra beside the quokka")
    assert bpe.decode(unseen) == "a zebra beside the quokka"
    assert len(unseen) > 7  # split into pieces, not one token per word
    # Merges learned from the captions: frequent words are one token.
    assert len(bpe.encode("red circle")) == 4
    assert {"red", "circle"} <= set(bpe.stoi)


def test_encode_batch_pads_and_cuts_at_max_tokens(scene_captions):
    tokenizer = Bpe(vocab_size=400, max_tokens=3).build(scene_captions, max_length=34)
    batch = tokenizer.encode_batch(["a red circle on the left", "red"])
    assert batch.shape == (2, 5)
    assert batch[0, -1] == tokenizer.end_index and batch[1, 2] == tokenizer.end_index
    assert (batch[1, 3:] == tokenizer.pad_index).all()
    assert tokenizer.decode_batch(batch[1:]) == ["red"]


def test_saved_and_read_back_equal_without_torch(bpe, tmp_path):
    payload = bpe.to_dict()
    again = tokenizer_from_dict(json.loads(json.dumps(payload)))
    assert again == bpe and again.encode("a blue square") == bpe.encode("a blue square")
    # The exported runtime reads the tokenizer where torch is not installed.
    (tmp_path / "tokenizer.json").write_text(json.dumps(payload))
    ids = bpe.encode("a small green triangle at the top")
    script = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from captioner.text.base import tokenizer_from_dict\n"
        f"t = tokenizer_from_dict(json.load(open({str(tmp_path / 'tokenizer.json')!r})))\n"
        f"print(t.decode({ids}))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "a small green triangle at the top"


def test_a_word_vocabulary_saved_by_captioner_0_2_reads_back_as_words():
    vocabulary = Vocabulary.build(["a red circle", "a red square"], min_count=1)
    old = {key: value for key, value in vocabulary.to_dict().items() if key != "class_path"}
    assert tokenizer_from_dict(old) == vocabulary


@pytest.mark.parametrize(
    "payload",
    [
        {"class_path": "captioner.text.subwords.SubwordTokenizer", "version": 1},
        {"class_path": "no.such.Tokenizer"},
        ["not", "a", "dict"],
    ],
)
def test_a_broken_saved_tokenizer_is_one_clear_error(payload):
    with pytest.raises(CaptionerError, match="tokenizer"):
        tokenizer_from_dict(payload, "model.ckpt")


def test_cider_scores_words_the_same_whichever_tokenizer_wrote_them(bpe, scene_captions):
    """CIDEr-D of a subword tokenizer is computed over the decoded words: equal to the word vocabulary's."""
    words = Words(min_count=1).build(scene_captions, max_length=34)
    references = [scene_captions[i : i + 5] for i in range(0, 50, 5)]
    hypotheses = ["a red circle on the left", "a big blue square", "a triangle"] * 3 + [references[-1][0]]
    scores = []
    for tokenizer in (words, bpe):
        cider = CiderD([[tokenizer.reference_words(c) for c in refs] for refs in references])
        generated = tokenizer.words_of(tokenizer.encode_batch(hypotheses))
        scores.append(cider.batch(generated, [[tokenizer.reference_words(c) for c in refs] for refs in references]))
    assert scores[0] == pytest.approx(scores[1], abs=1e-9)
    assert scores[0][-1] > 1.0  # a caption equal to a reference scores high: the ids really match
    # Word ids depend on the word alone, so every rank and process agrees.
    fresh = tokenizer_from_dict(bpe.to_dict())
    assert fresh.words_of(fresh.encode_batch(["blue square"])) == bpe.words_of(bpe.encode_batch(["blue square"]))


def test_a_pretrained_tokenizer_gets_padding_and_start_and_keeps_case(scene_captions, tmp_path):
    write_gpt2_like_tokenizer(tmp_path / "tokenizer.json", scene_captions)
    tokenizer = Pretrained(str(tmp_path), max_tokens=20).build(scene_captions, max_length=34)
    assert len(tokenizer) == 302  # its 300 and <pad>, <start>
    assert tokenizer.end_index == 0  # <|endoftext|> ends captions, as GPT-2 was trained
    assert {tokenizer.pad_index, tokenizer.start_index} == {300, 301}
    assert tokenizer.decode(tokenizer.encode("A Red circle.")) == "A Red circle."
    assert set(tokenizer.banned) == {300, 301}
    assert tokenizer_from_dict(tokenizer.to_dict()) == tokenizer


def test_an_unknown_model_id_offline_is_one_line_naming_the_cache():
    with pytest.raises(CaptionerError) as error:
        Pretrained("no-such-org/no-such-tokenizer").build(["a caption"], max_length=10)
    message = str(error.value)
    assert "no-such-org/no-such-tokenizer" in message and "models--no-such-org--no-such-tokenizer" in message
    assert "\n" not in message


def test_a_pretrained_tokenizer_without_the_end_token_says_which_option(scene_captions, tmp_path):
    write_gpt2_like_tokenizer(tmp_path / "tokenizer.json", scene_captions)
    with pytest.raises(CaptionerError, match="end_token"):
        Pretrained(str(tmp_path / "tokenizer.json"), end_token="</s>").build(scene_captions, max_length=10)


def test_a_checkpoint_refuses_data_prepared_with_another_tokenizer_naming_both(
    trained, scenes_source, tmp_path, capsys
):
    from captioner.cli import main

    checkpoint, _ = trained
    args = tiny_args(
        "test",
        scenes_source,
        tmp_path / "work",
        tmp_path,
        "--ckpt_path",
        str(checkpoint),
        "--data.tokenizer",
        "captioner.text.Bpe",
        "--data.tokenizer.vocab_size",
        "300",
    )
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Vocabulary" in err and "SubwordTokenizer" in err and "bpe 300" in err and "--data.tokenizer" in err


def test_training_with_bpe_writes_text_and_scores_words(scenes_source, tmp_path):
    """A run with a BPE tokenizer end to end: the checkpoint holds it, the test captions are text."""
    from captioner.cli import main

    cli = main(
        tiny_args(
            "fit",
            scenes_source,
            tmp_path / "work",
            tmp_path,
            "--trainer.max_epochs",
            "2",
            "--data.tokenizer",
            "captioner.text.Bpe",
            "--data.tokenizer.vocab_size",
            "400",
        )
    )
    model = cli.model
    assert isinstance(model.vocabulary, SubwordTokenizer) and model.decoder.hparams.vocab_size == len(model.vocabulary)
    checkpoint = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert checkpoint["captioner"]["vocabulary"]["source"] == "bpe 400"
    assert cli.trainer.callback_metrics["val/cider"] >= 0
