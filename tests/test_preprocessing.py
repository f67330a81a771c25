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
from captioner.core.pipeline import ImageInput, decoded_batches
from captioner.encoders import image_files as images_module
from captioner.encoders.image_files import TorchPixels
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
        cache = extract_cache(
            tmp_path / path_name,
            key,
            folder,
            names,
            FeatureSpec(encoder),
            "cpu",
            batch_size=4,
            threads=2,
            device_decode=device_decode,
        )
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
    files, opened = torch.cat(captioned[:2]), torch.cat(captioned[2:])
    # Files decode the same way when extracted and when captioned (large JPEGs reduced in the DCT, on the host)...
    centre = files.mean(dim=0)
    assert centred_cosine(files, cached["cpu"], centre).min() >= 0.999
    # ... and within the tolerance the GPU tests hold nvJPEG to of the full-size decodes: the device's, and a picture
    # a program opened itself.
    for features in (cached["device"], opened):
        assert centred_cosine(files, features, centre).min() >= 0.99
    assert centred_cosine(opened, cached["device"], centre).min() >= 0.999  # both full size
    # and different photographs stay different under the same measure
    assert centred_cosine(files[0], files[1], centre) < 0.5


def test_the_device_path_decodes_the_same_pixels_as_the_cpu_path(photographs):
    preprocessing = Preprocessing(224)
    decoded = TorchPixels(preprocessing, "cpu", device_decode=True).on_device([p.read_bytes() for p in photographs])
    full_size = torch.stack([preprocessing.from_file(path, reduced=False) for path in photographs])
    assert (torch.stack(decoded).int() - full_size.int()).abs().max() <= 2


def test_a_large_jpeg_decodes_reduced_within_the_device_paths_tolerance_and_other_images_whole(photographs, tmp_path):
    """A JPEG far larger than the input decodes at a fraction of its size (libjpeg's DCT scaling, keeping twice the
    pixels the resize needs); the encoder's input stays within the nvJPEG tolerance: a grey level or so on average
    and features with centred cosine >= 0.99. A PNG, and a JPEG barely larger than the input, decode whole."""
    large = tmp_path / "large.jpg"
    Image.open(SAMPLE_DATA / "motorcycle_left.png").convert("RGB").resize((4000, 2700)).save(large, quality=90)
    encoder = TorchvisionEncoder("resnet18", None, 64)
    preprocessing = encoder.preprocessing
    sources = [*photographs, large]
    with Image.open(large) as image:
        assert image.draft(None, preprocessing_needs(preprocessing, image.size)) is not None
        assert image.size == (500, 338)  # an eighth: 4000 / 8 >= 2 x 64 on the shorter side
    full = torch.stack([preprocessing.from_file(path, reduced=False) for path in sources])
    reduced = torch.stack([preprocessing.from_file(path) for path in sources])
    assert not torch.equal(full[-1], reduced[-1])  # the large one was reduced
    assert (full.float() - reduced.float()).abs().mean(dim=(1, 2, 3)).max() <= 1.5
    with torch.no_grad():
        a, b = encoder.eval()(full), encoder(reduced)
    assert centred_cosine(a, b, a.mean(dim=0)).min() >= 0.99
    png = tmp_path / "photo.png"
    Image.open(large).save(png)
    assert torch.equal(preprocessing.from_file(png), preprocessing.from_file(png, reduced=False))
    barely = tmp_path / "barely.jpg"
    Image.open(large).resize((100, 90)).save(barely)
    assert torch.equal(preprocessing.from_file(barely), preprocessing.from_file(barely, reduced=False))


def preprocessing_needs(preprocessing: Preprocessing, size: tuple[int, int]) -> tuple[int, int]:
    from captioner.core.pixels import needed_size

    return needed_size(*size, preprocessing.to_dict())


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
    return {
        "good.jpg": True,
        "grey.jpg": True,
        "cmyk.jpg": True,
        "picture.png": True,
        "truncated.jpg": False,
        "noise.jpg": False,
        "bomb.jpg": False,
        "empty.jpg": False,
    }


def test_decoding_ahead_in_several_threads_gives_the_batches_in_order(photographs):
    """The decode pipeline (here the device path on the CPU): any number of threads and batches ahead, the same
    batches in the same order."""
    pixels = TorchPixels(Preprocessing(64), "cpu", device_decode=True)
    inputs = [ImageInput(path.name, path) for path in [*photographs, *photographs]]
    one = list(decoded_batches(inputs, pixels, batch_size=3, threads=1, prefetch=0))
    three = list(decoded_batches(inputs, pixels, batch_size=3, threads=3, prefetch=3))
    assert len(one) == len(three) == 5
    for a, b in zip(one, three):
        assert a.names == b.names and a.ok == b.ok and torch.equal(a.pixels, b.pixels)
    assert [name for batch in one for name in batch.names] == [item.name for item in inputs]


def test_the_device_path_fails_bad_files_alone_like_the_cpu_path(photographs, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000_000)  # bomb.jpg (9 Mpx) is over twice the limit
    expected = _bad_files(tmp_path, photographs[0])
    names = sorted(expected)
    encoder = TorchvisionEncoder("resnet18", None, 64)
    failures = {}
    for path_name, device_decode in (("cpu", False), ("device", True)):
        key = f"{path_name}-key"
        failures[path_name] = extract_cache(
            tmp_path / path_name,
            key,
            tmp_path,
            names,
            FeatureSpec(encoder),
            "cpu",
            batch_size=4,
            threads=2,
            device_decode=device_decode,
        ).failed
    assert set(failures["cpu"]) == set(failures["device"]) == {name for name, ok in expected.items() if not ok}
    assert "too large" in failures["device"]["bomb.jpg"]
    # nvJPEG may return a half-grey picture for a truncated file: those never reach it, nor do CMYK JPEGs.
    for name, to_device in (
        ("good.jpg", True),
        ("grey.jpg", True),
        ("truncated.jpg", False),
        ("cmyk.jpg", False),
        ("picture.png", False),
    ):
        assert images_module.device_decodable((tmp_path / name).read_bytes()) == to_device, name


def test_a_failed_device_decode_falls_back_per_file_and_survives_a_bomb(photographs, tmp_path, monkeypatch):
    """nvJPEG failing a whole batch, then each file: the PIL fallback decodes what it can, bombs included, alone."""
    Image.new("RGB", (3000, 3000), "white").save(tmp_path / "bomb.jpg")
    raws = [photographs[0].read_bytes(), (tmp_path / "bomb.jpg").read_bytes()]

    def failing_decoder(*args, **kwargs):
        raise RuntimeError("nvjpeg: simulated failure")

    monkeypatch.setattr(images_module, "decode_jpeg", failing_decoder)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000_000)
    good, bomb = TorchPixels(Preprocessing(64), "cpu", device_decode=True).on_device(raws)
    assert isinstance(bomb, Image.DecompressionBombError)
    assert torch.equal(good, Preprocessing(64).from_file(io.BytesIO(raws[0]), reduced=False))


def test_images_of_one_size_are_resized_together_exactly_as_one_by_one():
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 120, 160), (3, 90, 70), (3, 120, 160), (3, 90, 70), (3, 120, 160)]
    images = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for shape in shapes]
    preprocessing = Preprocessing(64)
    resized = images_module._resized_by_shape([10, 11, 12, 13, 14], images, preprocessing)
    assert sorted(resized) == [10, 11, 12, 13, 14]
    for position, image in zip([10, 11, 12, 13, 14], images):
        assert torch.equal(resized[position], preprocessing.resize_tensor(image))


def test_one_upload_decodes_as_the_engine_decodes_a_batch_and_keeps_the_pixel_limit_on_either_path(photographs):
    """The server decodes each request with `pixels_from_bytes`: on a GPU a JPEG goes to nvJPEG as the engine's
    batches do (else the server's caption could differ from `Captioner`'s), and `--max_pixels` holds on that path
    too. Here the device path runs on the CPU (torchvision's decoder), the logic the GPU runs."""
    from captioner.core.pixels import TooManyPixelsError
    from captioner.inference.protocol import ImageCaptioner

    class Decoding(ImageCaptioner):
        def __init__(self, pixels: TorchPixels) -> None:
            self.pixels = pixels

        def pixel_decoder(self) -> TorchPixels:
            return self.pixels

    data = photographs[0].read_bytes()
    for device_decode in (True, False):
        pixels = TorchPixels(Preprocessing(64), "cpu", device_decode=device_decode)
        alone = Decoding(pixels).pixels_from_bytes(data)
        (batch,) = decoded_batches([ImageInput("photo", data)], pixels, batch_size=1)
        assert torch.equal(alone, batch.pixels[0]), device_decode
        with pytest.raises(TooManyPixelsError):
            Decoding(pixels).pixels_from_bytes(data, max_pixels=1000)
    full = TorchPixels(Preprocessing(64), "cpu", device_decode=True)
    assert torch.equal(Decoding(full).pixels_from_bytes(data), full.on_device([data])[0])  # nvJPEG's way, whole
