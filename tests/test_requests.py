"""One request at a time, in this process: every decoding setting a request may set, the model's limits checked
before it runs, decodes bounded, and the batcher answering each request of a batch on its own."""

import asyncio
import base64
import dataclasses
import io
import threading
import time

import pytest
import torch
from fastapi import HTTPException
from PIL import Image

from captioner import Captioner
from captioner.core.errors import CaptionerError
from captioner.decoding import DecodingConfig
from captioner.encoders.torchvision_models import TorchvisionEncoder
from captioner.models.decoders import TransformerDecoder
from captioner.models.module import CaptionModel
from captioner.serve.api import CaptionAPI, request_bounds
from captioner.serve.batching import RequestBatcher
from captioner.text.words import Vocabulary

VOCABULARY = Vocabulary(["a", "red", "blue", "circle", "square", "on", "the", "left"], max_length=12)


def transformer_captioner(max_length: int = 16) -> Captioner:
    """A Transformer over a small random ResNet: its position table holds `max_length` tokens."""
    torch.manual_seed(0)
    model = CaptionModel(
        lambda vocab, dim: TransformerDecoder(vocab, dim, width=16, layers=1, heads=2, max_length=max_length),
        encoder=TorchvisionEncoder("resnet18", None, 32),
    )
    model.build(VOCABULARY)
    return Captioner(model.eval(), decoding=DecodingConfig(num_beams=1))


@pytest.fixture(scope="module")
def api() -> CaptionAPI:
    api = CaptionAPI("unused.ckpt", max_decodes=2)
    api.attach(transformer_captioner())
    return api


def decoded(api: CaptionAPI, request: dict) -> dict:
    """`decode_request` as the server runs it (in an event loop)."""
    return asyncio.run(api.decode_request(request))


def jpeg(colour: str = "red") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


# A value of every DecodingConfig field, as a client would send it (JSON or a form field), and what it means.
EVERY_SETTING = {
    "num_beams": ("4", 4),
    "num_return": (2, 2),
    "length_penalty": ("0.6", 0.6),
    "max_length": (9, 9),
    "min_length": ("2", 2),
    "no_repeat_ngram_size": (2, 2),
    "bad_endings": ("a, the", ("a", "the")),
    "prefix": ("a red", "a red"),
    "force_words": ("circle|square, on the left", (("circle", "square"), "on the left")),
    "bad_words": (["blue", "the left"], ("blue", "the left")),
    "early_stopping": ("never", "never"),
    "num_beam_groups": (2, 2),
    "diversity_penalty": ("0.5", 0.5),
    "do_sample": ("false", False),
    "temperature": ("0.7", 0.7),
    "top_k": (5, 5),
    "top_p": ("0.9", 0.9),
    "seed": ("7", 7),
    "style": ("tags", "tags"),  # this model has no styles: refused (tests/test_styles.py asks a model with some)
}


def test_a_request_may_set_every_decoding_setting_for_itself(api):
    names = {field.name for field in dataclasses.fields(DecodingConfig)}
    assert set(request_bounds(api.captioner.limits)) == names == set(EVERY_SETTING)
    together = {name: value for name, value in EVERY_SETTING.items() if name not in ("force_words", "style")}
    request = decoded(api, {"image": jpeg(), **{name: sent for name, (sent, _) in together.items()}})
    assert request["decoding"] == DecodingConfig(**{name: meant for name, (_, meant) in together.items()})
    assert request["pixels"].shape == (3, 32, 32)
    # Each setting alone, on top of the server's own.
    for name, (sent, meant) in EVERY_SETTING.items():
        request = {"image": jpeg(), name: sent, **({"num_beams": 4} if name in ("num_beam_groups",) else {})}
        if name == "style":
            with pytest.raises(HTTPException, match="trained without caption styles"):
                decoded(api, request)
            continue
        assert getattr(decoded(api, request)["decoding"], name) == meant, name


@pytest.mark.parametrize(
    ("request_fields", "status", "says"),
    [
        ({"max_length": 100}, 400, "'max_length' must be between 1 and 15"),  # the position table: 16 tokens
        ({"top_k": 500}, 400, "'top_k' must be between 0 and 12"),  # the vocabulary: 12 tokens
        ({"bad_endings": "a zebra"}, 400, "'zebra' are not single tokens"),
        ({"min_length": 14}, 400, "min_length=14 is over the 12 words"),
        ({"early_stopping": "sometimes"}, 400, "'early_stopping' must be true or false"),
        ({"num_beams": 3, "num_beam_groups": 2}, 400, "a divisor of num_beams=3"),
        ({"image": "@@@"}, 400, "not valid base64"),
        ({"image": base64.b64encode(b"garbage").decode()}, 415, "Not an image"),
    ],
)
def test_a_setting_the_model_cannot_honour_is_a_4xx_naming_the_limit(api, request_fields, status, says):
    with pytest.raises(HTTPException) as refused:
        decoded(api, {"image": jpeg(), **request_fields})
    assert refused.value.status_code == status and says in refused.value.detail


def test_the_python_api_refuses_the_same_settings_before_the_model_runs():
    captioner = transformer_captioner()
    image = Image.new("RGB", (40, 30), "blue")
    with pytest.raises(CaptionerError, match="TransformerDecoder writes at most 15 words"):
        captioner.caption(image, max_length=100)
    with pytest.raises(CaptionerError, match="TransformerDecoder writes at most 15 words"):
        Captioner(captioner.model, max_length=40)
    assert len(captioner.caption(image, max_length=15, min_length=15)[0].split()) >= 15  # the limit itself runs


class SlowCaptioner:
    """Decodes take a while and are counted (how many at once); "bad" uploads fail to decode; "model-fails" fails in
    the model."""

    def __init__(self, captioner: Captioner) -> None:
        self.inner, self.lock = captioner, threading.Lock()
        self.running = self.most = 0
        self.batches: list[list[str]] = []
        self.decoding, self.limits = captioner.decoding, captioner.limits

    def pixel_decoder(self):
        return self.inner.pixel_decoder()

    def pixels_from_bytes(self, data: bytes, max_pixels=None):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return self.inner.pixels_from_bytes(data, max_pixels)

    def describe_pixels(self, pixels, config, attention=False, styles=()):
        return self.inner.describe_pixels(pixels, config, attention)


def test_each_request_is_decoded_and_answered_on_its_own_with_decodes_bounded():
    """Twelve requests at once through the server's own path (decode, batch, answer): three decodes at a time, never
    more; the bad upload gets its 415, the out-of-range setting its 400, and the rest their captions, batched."""
    api = CaptionAPI("unused.ckpt", max_decodes=3, max_batch_size=16, batch_timeout=0.2)
    slow = SlowCaptioner(transformer_captioner())
    api.attach(slow)
    requests = [{"image": jpeg(colour)} for colour in ("red", "blue", "green") * 3]
    requests += [{"image": base64.b64encode(b"garbage").decode()}, {"image": jpeg(), "max_length": 100}]

    async def served(request: dict):
        try:
            return await api.encode_response(await api.predict(await api.decode_request(request)))
        except HTTPException as refused:
            return refused

    async def all_at_once():
        return await asyncio.gather(*(served(request) for request in requests))

    started = time.perf_counter()
    answers = asyncio.run(all_at_once())
    took = time.perf_counter() - started
    assert slow.most == 3 and took < 10 * 0.05  # decodes ran three at a time, overlapping, never more
    good = answers[:9]
    assert all(answer["caption"] and answer["error"] is None for answer in good)
    assert max(answer["time_ms"]["batch_size"] for answer in good) > 1  # those that arrived together were batched
    expected = slow.inner.caption([Image.new("RGB", (40, 30), c) for c in ("red", "blue", "green")])
    assert [answer["caption"] for answer in good[:3]] == expected
    assert answers[9].status_code == 415 and answers[10].status_code == 400


def test_the_batcher_answers_each_request_with_its_own_result_or_error():
    """A request whose result is an error gets it alone; a batch that fails as a whole tells each of its requests;
    requests gathered within the window share a batch of at most `max_size`."""
    batches: list[list[str]] = []

    def run(items: list[str]) -> list:
        batches.append(items)
        if "crash" in items:
            raise RuntimeError("the model failed")
        return [ValueError(f"{item} failed") if item.startswith("bad") else f"caption of {item}" for item in items]

    batcher = RequestBatcher(run, max_size=4, timeout=0.2)

    async def submitted(item: str):
        try:
            return await batcher.submit(item)
        except Exception as error:
            return error

    async def main():
        first = await asyncio.gather(*(submitted(item) for item in ["a", "bad-b", "c", "d", "e"]))
        second = await asyncio.gather(*(submitted(item) for item in ["f", "crash"]))
        return first, second

    first, second = asyncio.run(main())
    assert first[0] == "caption of a" and str(first[1]) == "bad-b failed"
    assert first[2:] == ["caption of c", "caption of d", "caption of e"]
    assert [len(batch) for batch in batches[:2]] == [4, 1]  # five at once: a full batch, then the rest
    assert all(isinstance(answer, RuntimeError) for answer in second)  # the batch failed: both are told


def test_serve_builds_its_server_on_the_async_api_with_its_own_batcher(tmp_path):
    """What isolates each request: LitServe hands requests one by one to an async API (its public API: no private
    loop to subclass) and the API's RequestBatcher makes the batches."""
    from litserve.loops.simple_loops import SingleLoop

    from captioner.serve import build_server

    server = build_server(tmp_path / "model.ckpt", accelerator="cpu", max_batch_size=8, batch_timeout=0.05)
    (api,) = list(server.litapi_connector)
    assert isinstance(api, CaptionAPI) and api.enable_async and api.max_batch_size == 1
    assert isinstance(api.loop, SingleLoop)  # LitServe's own loop, one request per call
    api.attach(transformer_captioner())
    assert isinstance(api.batcher, RequestBatcher) and api.batcher.max_size == 8 and api.batcher.timeout == 0.05
