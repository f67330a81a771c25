"""The captioning engine (`captioner.inference.engine`) and the decode pipeline under it (`captioner.core.pipeline`):
images in any form, decoding overlapping the model, order kept, memory bounded, a bad image failing alone."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.core.pipeline import ImageInput, PipelineStats, as_inputs, decoded_batches
from captioner.decoding.answers import ROW_FIELDS, Prediction
from captioner.decoding.config import DecodingConfig
from captioner.inference.engine import CaptioningEngine


class RecordingDecoder:
    """Decodes "images" (their bytes are a number) and records when each decode starts."""

    def __init__(self, events: list, lock: threading.Lock) -> None:
        self.events, self.lock = events, lock

    def host(self, data, max_pixels=None):
        if data == b"bad":
            raise OSError("not an image")
        with self.lock:
            self.events.append(("decode", int(data)))
        return np.full((3, 2, 2), int(data), dtype=np.uint8)

    def for_device(self, data: bytes, max_pixels=None) -> bool:
        return False

    def on_device(self, encoded):
        raise AssertionError("no device here")

    def stack(self, pixels):
        return np.stack(pixels)


class RecordingCaptioner:
    """Captions a batch by naming its pixels; captioning batch 0 waits until a decode of batch 1 has started (or
    10 s), so a pipeline that decodes only after captioning records batch 1's decodes after batch 0's end."""

    batch_size = 4

    def __init__(self) -> None:
        self.events, self.lock = [], threading.Lock()
        self.decoding = DecodingConfig(num_beams=1)
        self.batch_one_started = threading.Event()

    def pixel_decoder(self) -> RecordingDecoder:
        decoder = RecordingDecoder(self.events, self.lock)
        host = decoder.host

        def noting(data, max_pixels=None):
            if data not in (b"bad",) and int(data) >= self.batch_size:
                self.batch_one_started.set()
            return host(data, max_pixels)

        decoder.host = noting
        return decoder

    def describe_pixels(self, pixels, config, attention=False, styles=()):
        first = int(pixels[0, 0, 0, 0])
        with self.lock:
            self.events.append(("caption starts", first))
        if first == 0:
            self.batch_one_started.wait(10)
        with self.lock:
            self.events.append(("caption ends", first))
        return [{"caption": f"image {int(p[0, 0, 0])}", "score": -1.0} for p in pixels]


def test_the_next_batch_decodes_while_this_one_is_captioned():
    captioner = RecordingCaptioner()
    inputs = [ImageInput(f"image-{i}", str(i).encode()) for i in range(12)]
    engine = CaptioningEngine(captioner, batch_size=4, decode_threads=2, prefetch=1)
    rows = [prediction for batch in engine.batches(inputs) for _, prediction in batch]
    assert [row.caption for row in rows] == [f"image {i}" for i in range(12)]
    events = captioner.events
    first_caption_ends = events.index(("caption ends", 0))
    batch_one_decodes = [events.index(("decode", i)) for i in range(4, 8)]
    assert min(batch_one_decodes) < first_caption_ends, events


def test_without_prefetch_decoding_waits_for_the_model():
    """The same recorder tells the difference: with nothing decoded ahead, batch 1 decodes after batch 0 is done."""
    captioner = RecordingCaptioner()
    captioner.batch_one_started.set()  # nothing to wait for
    inputs = [ImageInput(f"image-{i}", str(i).encode()) for i in range(8)]
    list(CaptioningEngine(captioner, batch_size=4, decode_threads=2, prefetch=0).batches(inputs))
    events = captioner.events
    assert min(events.index(("decode", i)) for i in range(4, 8)) > events.index(("caption ends", 0))


def test_a_bad_image_fails_alone_in_order_and_rows_have_every_field():
    captioner = RecordingCaptioner()
    captioner.batch_one_started.set()
    inputs = [
        ImageInput("a", b"1"),
        ImageInput("bad", b"bad"),
        ImageInput("gone", FileNotFoundError("gone")),
        ImageInput("b", b"2"),
    ]
    rows = list(CaptioningEngine(captioner, batch_size=3).predictions(inputs))
    assert [(r.image, r.caption) for r in rows] == [("a", "image 1"), ("bad", None), ("gone", None), ("b", "image 2")]
    assert rows[1].error == "unreadable image (OSError: not an image)" and rows[2].error == "file not found"
    assert all(tuple(row.row()) == ROW_FIELDS for row in rows)


def test_prefetch_holds_a_bounded_number_of_batches_however_long_the_input():
    """The pipeline reads its input lazily: with one batch ahead, at most three batches' images have been read when
    the first reaches the caller."""
    read = []

    def images():
        for i in range(1000):
            read.append(i)
            yield ImageInput(str(i), str(i % 200).encode())

    decoder = RecordingDecoder([], threading.Lock())
    batches = decoded_batches(images(), decoder, batch_size=10, threads=2, prefetch=1)
    next(batches)
    time.sleep(0.2)
    assert len(read) <= 30
    batches.close()


def test_any_form_of_image_is_named_and_read(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), "red").save(path)
    images = [path, str(path), path.read_bytes(), Image.open(path), np.zeros((8, 8, 3), np.uint8)]
    named = [item.name for item in as_inputs(images)]
    assert named == [str(path), str(path), "<bytes #2>", "<PngImageFile #3>", "<ndarray #4>"]
    assert isinstance(next(as_inputs([path])).data, Path)


def test_stats_say_how_long_the_model_waited_for_images():
    captioner = RecordingCaptioner()
    captioner.batch_one_started.set()
    engine = CaptioningEngine(captioner, batch_size=2, prefetch=1)
    list(engine.predictions([str(i).encode() for i in range(6)]))
    stats = engine.stats
    assert stats.images == 6 and stats.batches == 3 and 0 <= stats.waiting_share <= 1
    assert PipelineStats(waited_s=1, busy_s=3).waiting_share == pytest.approx(0.25)


def test_a_row_is_one_schema_with_the_old_name_of_its_image():
    row = Prediction.answered(
        "a.jpg", {"caption": "a", "score": -1.0, "confidence": 0.5, "alternatives": [{"caption": "a", "score": -1.0}]}
    )
    assert row.row() == {
        "image": "a.jpg",
        "caption": "a",
        "score": -1.0,
        "confidence": 0.5,
        "alternatives": [{"caption": "a", "score": -1.0}],
        "constraints_met": None,
        "clip_score": None,
        "error": None,
    }
    assert row.source == "a.jpg"  # captioner 0.3's name
