"""One image pipeline: extraction (CPU and device paths) and captioning see the same pixels and features.

Real photographs (the sample images scikit-image ships), not flat shapes: JPEG
decoding shortcuts show up on photographic detail.
"""

import functools
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.encoders import image_files as images_module
from captioner.encoders.image_files import EncodedFileDataset, collate_encoded, decode_on_device
from captioner.encoders.preprocessing import Preprocessing
from captioner.encoders.torchvision_models import TorchvisionEncoder
from captioner.features.cache import extract_cache
from captioner.features.keys import FeatureSpec
from captioner.models.decoders import LSTMDecoder
from captioner.models.module import CaptionModel
from captioner.text.words import Vocabulary

SAMPLE_DATA = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
JPEGS = ("rocket.jpg", "retina.jpg", "hubble_deep_field.jpg")
PNGS = ("astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png")  # saved as JPEGs by the test


@pytest.fixture(scope="module")
def photographs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photographs")
    paths = []
    for name in JPEGS:
        paths.append(folder / name)
        paths[-1].write_bytes((SAMPLE_DATA / name).read_bytes())
    for name in PNGS:
        paths.append(folder / name.replace(".png", ".jpg"))
        Image.open(SAMPLE_DATA / name).convert("RGB").save(paths[-1], quality=90)
    return paths


def centred_cosine(a: torch.Tensor, b: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Cosine similarity after removing the features' common component (a random ResNet's features share most of
    their direction, so raw cosines are all near 1 and tell nothing apart)."""
    return torch.nn.functional.cosine_similarity(a - centre, b - centre, dim=-1)


def test_extraction_and_captioning_give_the_same_features_for_the_same_photograph(photographs, tmp_path):
    names = [path.name for path in photographs]
    folder = photographs[0].parent
    encoder = TorchvisionEncoder("resnet50", None, 224)
    cached = {}
    for path_name, device_decode in (("cpu", False), ("device", True)):  # the GPU's path, on the CPU
        key = f"{path_name}-key"
        cache = extract_cache(tmp_path / path_name, key, folder, names, FeatureSpec(encoder), "cpu", batch_size=4,
                              threads=2, device_decode=device_decode)  # fmt: skip
        assert not cache.failed
        cached[path_name] = torch.from_numpy(np.asarray(cache.features, dtype=np.float32))

    decoder = functools.partial(LSTMDecoder, embed_dim=8, hidden_dim=8)
    model = CaptionModel(decoder, encoder=TorchvisionEncoder("resnet50", None, 224))
    model.build(Vocabulary(["a"], max_length=3))
    captioned = []
    model.encoder.register_forward_hook(lambda module, inputs, output: captioned.append(output.float()))
    captioner = Captioner(model.eval(), batch_size=4)
    captioner.predict(photographs)  # files, decoded in the captioning path's own loader
    captioner.predict([Image.open(path) for path in photographs])  # PIL images a program already opened
    for features in (torch.cat(captioned[:2]), torch.cat(captioned[2:])):
        centre = features.mean(dim=0)
        for path_name, extracted in cached.items():
            similarity = centred_cosine(features, extracted, centre)
            assert similarity.min() >= 0.999, (path_name, similarity)
        # and different photographs stay different under the same measure
        assert centred_cosine(features[0], features[1], centre) < 0.5


def test_the_device_path_decodes_the_same_pixels_as_the_cpu_path(photographs):
    preprocessing = Preprocessing(224)
    dataset = EncodedFileDataset(photographs, preprocessing)
    batch = decode_on_device(collate_encoded([dataset[i] for i in range(len(photographs))]), preprocessing, "cpu")
    assert batch["ok"] == list(range(len(photographs))) and not batch["errors"]
    cpu = torch.stack([preprocessing.from_file(path) for path in photographs])
    assert (batch["images"].int() - cpu.int()).abs().max() <= 2


def _bad_files(folder: Path, photograph: Path) -> dict[str, bool]:
    """Files of every kind the device path must handle; name -> whether it should decode."""
    image = Image.open(photograph).convert("RGB")
    image.save(folder / "good.jpg", quality=90)
    image.convert("L").save(folder / "grey.jpg")
    image.convert("CMYK").save(folder / "cmyk.jpg")  # nvJPEG cannot: decoded by PIL
    image.save(folder / "picture.png")  # not a JPEG: decoded by PIL
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "noise.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8 + b"\xff\xd9")
    Image.new("RGB", (3000, 3000), "white").save(folder / "bomb.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    return {"good.jpg": True, "grey.jpg": True, "cmyk.jpg": True, "picture.png": True, "truncated.jpg": False,
            "noise.jpg": False, "bomb.jpg": False, "empty.jpg": False}  # fmt: skip


def test_decoding_ahead_in_several_threads_gives_the_batches_in_order(photographs):
    """The device path's decode threads (here on the CPU): any number of them, the same batches in the same order."""
    from torch.utils.data import DataLoader

    loader = DataLoader(EncodedFileDataset([*photographs, *photographs], Preprocessing(64)), batch_size=3,
                        collate_fn=collate_encoded)  # fmt: skip
    one = list(images_module.decoded_ahead(loader, Preprocessing(64), "cpu", threads=1))
    three = list(images_module.decoded_ahead(loader, Preprocessing(64), "cpu", threads=3))
    assert len(one) == len(three) == 5
    for a, b in zip(one, three):
        assert a["positions"] == b["positions"] and a["ok"] == b["ok"] and torch.equal(a["images"], b["images"])


def test_the_device_path_fails_bad_files_alone_like_the_cpu_path(photographs, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000_000)  # bomb.jpg (9 Mpx) is over twice the limit
    expected = _bad_files(tmp_path, photographs[0])
    names = sorted(expected)
    encoder = TorchvisionEncoder("resnet18", None, 64)
    failures = {}
    for path_name, device_decode in (("cpu", False), ("device", True)):
        key = f"{path_name}-key"
        failures[path_name] = extract_cache(tmp_path / path_name, key, tmp_path, names, FeatureSpec(encoder), "cpu",
                                            batch_size=4, threads=2, device_decode=device_decode).failed  # fmt: skip
    assert set(failures["cpu"]) == set(failures["device"]) == {name for name, ok in expected.items() if not ok}
    assert "too large" in failures["device"]["bomb.jpg"]
    # nvJPEG may return a half-grey picture for a truncated file: those never reach it, nor do CMYK JPEGs.
    for name, to_device in (("good.jpg", True), ("grey.jpg", True), ("truncated.jpg", False), ("cmyk.jpg", False),
                            ("picture.png", False)):  # fmt: skip
        assert images_module.device_decodable((tmp_path / name).read_bytes()) == to_device, name


def test_a_failed_device_decode_falls_back_per_file_and_survives_a_bomb(photographs, tmp_path, monkeypatch):
    """nvJPEG failing a whole batch, then each file: the PIL fallback decodes what it can, bombs included, alone."""
    Image.new("RGB", (3000, 3000), "white").save(tmp_path / "bomb.jpg")
    raws = {0: photographs[0].read_bytes(), 1: (tmp_path / "bomb.jpg").read_bytes()}
    batch = {"positions": [0, 1], "paths": ["a", "b"], "decoded": {}, "errors": {},
             "jpegs": {p: torch.frombuffer(bytearray(raw), dtype=torch.uint8) for p, raw in raws.items()}}  # fmt: skip

    def failing_decoder(*args, **kwargs):
        raise RuntimeError("nvjpeg: simulated failure")

    monkeypatch.setattr(images_module, "decode_jpeg", failing_decoder)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000_000)
    out = decode_on_device(batch, Preprocessing(64), "cpu")
    assert out["ok"] == [0] and out["images"].shape == (1, 3, 64, 64)
    assert "too large" in out["errors"][1]
    assert torch.equal(out["images"][0], Preprocessing(64).from_file(io.BytesIO(raws[0])))


def test_images_of_one_size_are_resized_together_exactly_as_one_by_one():
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 120, 160), (3, 90, 70), (3, 120, 160), (3, 90, 70), (3, 120, 160)]
    images = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for shape in shapes]
    preprocessing = Preprocessing(64)
    resized = images_module._resized_by_shape([10, 11, 12, 13, 14], images, preprocessing)
    assert sorted(resized) == [10, 11, 12, 13, 14]
    for position, image in zip([10, 11, 12, 13, 14], images):
        assert torch.equal(resized[position], preprocessing.resize_tensor(image))
