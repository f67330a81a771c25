"""The contract every captioner keeps (`captioner.inference.CaptionerProtocol`), run on each implementation as the
decoder suite runs on each decoder: the PyTorch `Captioner` and the torch-free `OnnxCaptioner`, built from one
trained checkpoint. Code written against the protocol (the server, `caption`, `caption-set`) works with either."""

import io

import numpy as np
import pytest
from PIL import Image

from captioner import Captioner
from captioner.core.errors import CaptionerError
from captioner.core.pixels import DECODE_ERRORS
from captioner.inference import CaptionerProtocol, OnnxCaptioner

BACKENDS = ["pytorch", "onnx"]


@pytest.fixture(scope="module")
def captioners(trained, tmp_path_factory):
    from captioner.cli import main

    checkpoint, _ = trained
    folder = tmp_path_factory.mktemp("protocol") / "onnx"
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(folder)])
    # A batch smaller than the lists below, so batching is part of what is checked.
    return {
        "pytorch": Captioner.from_checkpoint(checkpoint, device="cpu", batch_size=3),
        "onnx": OnnxCaptioner(folder, batch_size=3),
    }


@pytest.fixture
def images(scenes_source):
    return sorted((scenes_source / "Images").iterdir())[:7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_captioner_is_a_captioner_protocol_with_the_models_own_settings(captioners, backend):
    captioner = captioners[backend]
    assert isinstance(captioner, CaptionerProtocol)
    assert captioner.settings() == captioner.decoding  # no overrides: the settings the model was saved with
    assert captioner.settings(num_beams=4).num_beams == 4 and captioner.decoding.num_beams != 4  # a copy changes
    assert captioner.batch_size == 3 and captioner.limits.vocab_size > 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_image_in_any_form_captions_as_it_does_in_a_list(captioners, backend, images):
    captioner = captioners[backend]
    path = images[2]
    alone = captioner.caption(path)
    assert isinstance(alone, list) and len(alone) == 1 and alone[0]
    assert alone[0] == captioner.caption(images)[2] == captioner.caption(str(path))[0]
    assert captioner.caption(path.read_bytes()) == alone and captioner.caption(Image.open(path)) == alone


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unreadable_image_fails_alone_in_predict_and_by_name_in_caption(captioners, backend, images, tmp_path):
    captioner = captioners[backend]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a picture at all")
    mixed = [*images[:4], broken, *images[4:]]
    predictions = captioner.predict(mixed)
    assert [p.image for p in predictions] == [str(p) for p in mixed]
    assert predictions[4].caption is None and predictions[4].score is None and predictions[4].error
    good = [p for i, p in enumerate(predictions) if i != 4]
    assert [p.caption for p in good] == captioner.caption(images) and all(p.error is None for p in good)
    assert all(p.score < 0 for p in good)  # a caption's log-probability
    assert list(captioner.iter_predict(mixed)) == predictions  # batch by batch, the same answers in order
    with pytest.raises(CaptionerError, match="broken.jpg"):
        captioner.caption(mixed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_settings_are_checked_before_the_model_runs(captioners, backend, images):
    captioner = captioners[backend]
    for bad in (
        {"num_beams": 0},
        {"max_length": 0},
        {"top_p": 1.5},
        {"not_a_setting": 1},
        {"force_words": ["zebraphone"]},
        {"bad_endings": ["zebraphone"]},
    ):
        with pytest.raises(CaptionerError):
            captioner.caption(images[0], **bad)
        with pytest.raises(CaptionerError):
            captioner.settings(**bad)
    short = captioner.caption(images, max_length=2)
    assert all(len(caption.split()) <= 2 for caption in short) and short != captioner.caption(images)


@pytest.mark.parametrize("backend", BACKENDS)
def test_describe_gives_the_caption_and_its_ranked_alternatives(captioners, backend, images):
    captioner = captioners[backend]
    pictures = [Image.open(path) for path in images[:3]]
    described = captioner.describe(pictures, num_beams=4, num_return=3)
    assert [row["caption"] for row in described] == captioner.caption(images[:3], num_beams=4)
    for row in described:
        scores = [alternative["score"] for alternative in row["alternatives"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert row["alternatives"][0]["caption"] == row["caption"]
        assert len({alternative["caption"] for alternative in row["alternatives"]}) == 3
        assert 0 <= row["confidence"] <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixels_from_bytes_is_the_encoders_input_or_a_decode_error(captioners, backend, images):
    captioner = captioners[backend]
    pixels = np.asarray(captioner.pixels_from_bytes(images[0].read_bytes()))
    size = captioners["pytorch"].preprocessing.image_size
    assert pixels.shape == (3, size, size) and pixels.dtype == np.uint8
    other = np.asarray(captioner.pixels_from_bytes(images[1].read_bytes()))
    assert not np.array_equal(pixels, other)
    with pytest.raises(DECODE_ERRORS):
        captioner.pixels_from_bytes(b"\x89PNG\r\n\x1a\n truncated")
    huge = io.BytesIO()
    Image.new("RGB", (400, 300)).save(huge, format="PNG")
    with pytest.raises(DECODE_ERRORS):
        captioner.pixels_from_bytes(huge.getvalue(), max_pixels=1000)


def test_both_captioners_answer_alike(captioners, images):
    """The same contract, the same answers: captions, errors and sources match across the two."""
    ours, theirs = (captioners[backend].predict(images) for backend in BACKENDS)
    assert [(p.image, p.caption, p.error) for p in ours] == [(p.image, p.caption, p.error) for p in theirs]
    assert np.allclose([p.score for p in ours], [p.score for p in theirs], atol=1e-3)
