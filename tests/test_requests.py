"""One request at a time, in this process: every decoding setting a request may set, the model's limits checked
before it runs, and the batching loop answering each request of a batch on its own."""

import base64
import dataclasses
import io
import threading
import time

import pytest
import torch
from fastapi import HTTPException
from litserve.utils import LitAPIStatus, PickleableHTTPException
from PIL import Image

from captioner import Captioner
from captioner.core.errors import CaptionerError
from captioner.decoding import DecodingConfig
from captioner.encoders.torchvision_models import TorchvisionEncoder
from captioner.models.decoders import TransformerDecoder
from captioner.models.module import CaptionModel
from captioner.serve.api import CaptionAPI, request_bounds
from captioner.serve.batching import IsolatingBatchedLoop
from captioner.text.words import Vocabulary

VOCABULARY = Vocabulary(["a", "red", "blue", "circle", "square", "on", "the", "left"], max_length=12)


def transformer_captioner(max_length: int = 16) -> Captioner:
    """A Transformer over a small random ResNet: its position table holds `max_length` tokens."""
    torch.manual_seed(0)
    model = CaptionModel(lambda vocab, dim: TransformerDecoder(vocab, dim, width=16, layers=1, heads=2,
                                                               max_length=max_length),
                         encoder=TorchvisionEncoder("resnet18", None, 32))  # fmt: skip
    model.build(VOCABULARY)
    return Captioner(model.eval(), decoding=DecodingConfig(num_beams=1))


@pytest.fixture(scope="module")
def api() -> CaptionAPI:
    api = CaptionAPI("unused.ckpt", max_decodes=2)
    api.captioner, api.decode_slots = transformer_captioner(), threading.BoundedSemaphore(2)
    return api


def jpeg(colour: str = "red") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


# A value of every DecodingConfig field, as a client would send it (JSON or a form field), and what it means.
EVERY_SETTING = {
    "num_beams": ("4", 4), "num_return": (2, 2), "length_penalty": ("0.6", 0.6), "max_length": (9, 9),
    "min_length": ("2", 2), "no_repeat_ngram_size": (2, 2), "bad_endings": ("a, the", ("a", "the")),
    "prefix": ("a red", "a red"), "force_words": ("circle|square, on the left", (("circle", "square"), "on the left")),
    "bad_words": (["blue", "the left"], ("blue", "the left")),
    "early_stopping": ("never", "never"), "num_beam_groups": (2, 2), "diversity_penalty": ("0.5", 0.5),
    "do_sample": ("false", False), "temperature": ("0.7", 0.7), "top_k": (5, 5), "top_p": ("0.9", 0.9),
    "seed": ("7", 7),
}  # fmt: skip


def test_a_request_may_set_every_decoding_setting_for_itself(api):
    names = {field.name for field in dataclasses.fields(DecodingConfig)}
    assert set(request_bounds(api.captioner.limits)) == names == set(EVERY_SETTING)
    together = {name: value for name, value in EVERY_SETTING.items() if name != "force_words"}  # not with groups
    decoded = api.decode_request({"image": jpeg(), **{name: sent for name, (sent, _) in together.items()}})
    assert decoded["decoding"] == DecodingConfig(**{name: meant for name, (_, meant) in together.items()})
    assert decoded["image"].shape == (3, 32, 32)
    # Each setting alone, on top of the server's own.
    for name, (sent, meant) in EVERY_SETTING.items():
        request = {"image": jpeg(), name: sent, **({"num_beams": 4} if name in ("num_beam_groups",) else {})}
        assert getattr(api.decode_request(request)["decoding"], name) == meant, name


@pytest.mark.parametrize(("request_fields", "status", "says"), [
    ({"max_length": 100}, 400, "'max_length' must be between 1 and 15"),  # the position table: 16 tokens
    ({"top_k": 500}, 400, "'top_k' must be between 0 and 12"),  # the vocabulary: 12 tokens
    ({"bad_endings": "a zebra"}, 400, "'zebra' are not single tokens"),
    ({"min_length": 14}, 400, "min_length=14 is over the 12 words"),
    ({"early_stopping": "sometimes"}, 400, "'early_stopping' must be true or false"),
    ({"num_beams": 3, "num_beam_groups": 2}, 400, "a divisor of num_beams=3"),
    ({"image": "@@@"}, 400, "not valid base64"),
    ({"image": base64.b64encode(b"garbage").decode()}, 415, "Not an image"),
])  # fmt: skip
def test_a_setting_the_model_cannot_honour_is_a_4xx_naming_the_limit(api, request_fields, status, says):
    with pytest.raises(HTTPException) as refused:
        api.decode_request({"image": jpeg(), **request_fields})
    assert refused.value.status_code == status and says in refused.value.detail


def test_the_python_api_refuses_the_same_settings_before_the_model_runs():
    captioner = transformer_captioner()
    image = Image.new("RGB", (40, 30), "blue")
    with pytest.raises(CaptionerError, match="TransformerDecoder writes at most 15 words"):
        captioner.caption(image, max_length=100)
    with pytest.raises(CaptionerError, match="TransformerDecoder writes at most 15 words"):
        Captioner(captioner.model, max_length=40)
    assert len(captioner.caption(image, max_length=15, min_length=15)[0].split()) >= 15  # the limit itself runs


class Transport:
    """What the loop sends back, by request id."""

    def __init__(self) -> None:
        self.sent: dict[str, tuple] = {}

    def send(self, item, consumer_id) -> None:
        uid, (data, status, *_) = item
        self.sent[uid] = (data, status)


class Callbacks:
    def trigger_event(self, *args, **kwargs) -> None:
        pass


class SlowDecodes:
    """A LitAPI whose requests take a while to decode, counting how many decode at once; "bad" ones fail."""

    def __init__(self, slots: int) -> None:
        self.slots, self.lock = threading.BoundedSemaphore(slots), threading.Lock()
        self.running = self.most = 0
        self.batches: list[list[str]] = []

    def decode_request(self, request: str) -> str:
        with self.slots:
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(0.05)
            with self.lock:
                self.running -= 1
        if request.startswith("bad"):
            raise HTTPException(422, f"{request} cannot be decoded")
        if request == "crash":
            raise RuntimeError("a bug")
        return request

    def batch(self, inputs):
        return inputs

    def predict(self, inputs):
        self.batches.append(list(inputs))
        return [ValueError("this one failed in the model") if item == "model-fails" else f"caption of {item}"
                for item in inputs]  # fmt: skip

    def unbatch(self, outputs):
        return outputs

    def encode_response(self, output):
        return {"caption": output}


def test_each_request_of_a_batch_is_decoded_and_answered_on_its_own_with_decodes_bounded():
    api, transport, loop = SlowDecodes(slots=3), Transport(), IsolatingBatchedLoop(decode_threads=3)
    loop.start_decoders()  # what the worker does before its first batch
    requests = [f"good{i}" for i in range(9)] + ["bad-jpeg", "crash", "model-fails"]
    batch = [(0, f"uid-{name}", name) for name in requests]
    started = time.perf_counter()
    loop.serve_batch(api, batch, transport, Callbacks())
    took = time.perf_counter() - started

    assert api.most == 3  # decodes ran three at a time, never more
    assert took < 12 * 0.05  # so the batch's decodes overlapped
    assert api.batches == [[f"good{i}" for i in range(9)] + ["model-fails"]]  # only what decoded reached the model
    for i in range(9):
        assert transport.sent[f"uid-good{i}"] == ({"caption": f"caption of good{i}"}, LitAPIStatus.OK)
    refused, status = transport.sent["uid-bad-jpeg"]
    assert status == LitAPIStatus.ERROR and isinstance(refused, PickleableHTTPException)
    assert refused.status_code == 422 and "bad-jpeg cannot be decoded" in refused.detail
    assert transport.sent["uid-crash"][1] == LitAPIStatus.ERROR
    assert transport.sent["uid-model-fails"][1] == LitAPIStatus.ERROR
