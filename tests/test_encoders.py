"""Encoders as parts: every built-in family trains, tests, captions and exports; one pixel definition everywhere;
an encoder written outside the package; the faults a user can make, each with one clear message."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from captioner import Captioner
from captioner.cli import main
from captioner.core.errors import CaptionerError
from captioner.core.pixels import preprocess_array
from captioner.encoders import HuggingFaceEncoder, OpenClipEncoder, TimmEncoder, TorchvisionEncoder
from captioner.encoders.preprocessing import Preprocessing
from captioner.export.onnx import export_onnx
from captioner.features.cache import FEATURES_FILE, INDEX_FILE
from captioner.inference import OnnxCaptioner
from captioner.models import captioning
from captioner.models.module import CaptionModel
from tests.conftest import last_checkpoint, tiny_args

SAMPLE_DATA = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
TINY_CLIP = {
    "model_type": "clip",
    "projection_dim": 24,
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "text_config": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 64,
    },
}
TINY_OPEN_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
LSTM = {"class_path": "captioner.models.decoders.LSTMDecoder", "init_args": {"embed_dim": 32, "hidden_dim": 64}}
TRANSFORMER = {
    "class_path": "captioner.models.decoders.TransformerDecoder",
    "init_args": {"width": 32, "layers": 1, "heads": 2, "ffn_dim": 64},
}
ATTENTION = {
    "class_path": "captioner.models.decoders.AttentionDecoder",
    "init_args": {"embed_dim": 32, "hidden_dim": 64, "attention_dim": 32},
}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> str:
    """A two-layer OpenCLIP ViT registered with OpenCLIP's own model-config registry (as a user adds one)."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    (folder / "captioner-test-ViT.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(folder / "captioner-test-ViT.json")
    return "captioner-test-ViT"


FAMILIES = {
    "torchvision": (
        {
            "class_path": "captioner.encoders.TorchvisionEncoder",
            "init_args": {"model": "resnet18", "weights": None, "image_size": 32},
        },
        LSTM,
    ),
    "timm": (
        {
            "class_path": "captioner.encoders.TimmEncoder",
            "init_args": {"model_name": "test_vit", "pretrained": False, "image_size": 64},
        },
        TRANSFORMER,
    ),
    "open_clip": (
        {
            "class_path": "captioner.encoders.OpenClipEncoder",
            "init_args": {"model_name": "captioner-test-ViT", "pretrained": None},
        },
        ATTENTION,
    ),
    "hugging_face": (
        {
            "class_path": "captioner.encoders.HuggingFaceEncoder",
            "init_args": {"config": TINY_CLIP, "pretrained": False},
        },
        LSTM,
    ),
}


def overlay(tmp_path: Path, encoder: dict, decoder: dict, **model) -> str:
    """A config overlay choosing the encoder and decoder, as a user's file would."""
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump({"model": {"encoder": encoder, "decoder": decoder, **model}}))
    return str(path)


def centred_cosine(a: np.ndarray, b: np.ndarray, centre: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1) - centre.reshape(-1), b.reshape(len(b), -1) - centre.reshape(-1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_tests_captions_and_exports_with_one_pixel_definition(
    family, scenes_source, tmp_path, tiny_open_clip
):
    encoder_config, decoder_config = FAMILIES[family]
    config = overlay(tmp_path, encoder_config, decoder_config)
    cli = main(
        tiny_args("fit", scenes_source, tmp_path / "work", tmp_path, "--config", config, "--test_after_fit", "true")
    )
    model: CaptionModel = cli.model
    assert type(model.encoder).__name__ == encoder_config["class_path"].rsplit(".", 1)[-1]
    assert cli.datamodule.encoder is model.encoder  # one instance: configured once, extracted and captioned with
    report = model.test_results["report"]
    assert report["images"] == 20
    # It learned from the features: held-out loss well under an untrained decoder's (about log of the vocabulary).
    assert float(cli.trainer.callback_metrics["test/loss"]) < 0.8 * math.log(len(model.vocabulary))

    best = cli.trainer.checkpoint_callback.best_model_path
    meta = torch.load(best, weights_only=True)["captioner"]
    assert meta["encoder"]["class_path"].endswith(encoder_config["class_path"].rsplit(".", 1)[-1])
    images = sorted((scenes_source / "Images").iterdir())[:6]
    captioner = Captioner.from_checkpoint(best, device="cpu")
    captions = captioner.caption(images)
    rows = captioning.describe(model.cpu().eval(), torch.stack([captioner.preprocessing.from_file(p) for p in images]))
    assert captions == [row["caption"] for row in rows]  # the checkpoint captions as the trained model did

    # The same features at extraction (the cache), at captioning time (torch) and in the exported runtime (numpy).
    (cache,) = [p for p in (tmp_path / "work" / "features").iterdir() if (p / INDEX_FILE).exists()]
    index = json.loads((cache / INDEX_FILE).read_text())
    rows = [index["file_names"].index(path.name) for path in images]
    cached = np.load(cache / FEATURES_FILE)[rows].astype(np.float32)
    grid = decoder_config is not LSTM
    pixels = torch.stack([captioner.preprocessing.from_file(path) for path in images])
    with torch.no_grad():
        captioned = captioner.model.encoder(pixels, grid=grid).numpy()
    exported = export_onnx(captioner.model, tmp_path / "onnx")
    runtime = OnnxCaptioner(exported)  # the checkpoint's decoding settings, from the manifest
    runtime_pixels = np.stack([runtime.pixels_from_bytes(path.read_bytes()) for path in images])
    assert np.abs(runtime_pixels.astype(int) - pixels.numpy().astype(int)).max() <= 1  # within one grey level
    from_runtime = runtime.features(runtime_pixels)
    centre = captioned.mean(axis=0)
    assert centred_cosine(cached, captioned, centre).min() > 0.999
    assert centred_cosine(from_runtime, captioned, centre).min() > 0.99
    assert runtime.caption(images) == captions


def test_an_encoder_written_outside_the_package_works_by_class_path(scenes_source, tmp_path):
    cli = main(
        tiny_args(
            "fit",
            scenes_source,
            tmp_path / "work",
            tmp_path,
            "--model.encoder",
            "tests.plugins.TinyConvEncoder",
            "--model.encoder.width",
            "16",
        )
    )
    assert type(cli.model.encoder).__name__ == "TinyConvEncoder" and cli.model.encoder.feature_dim == 16
    captioner = Captioner.from_checkpoint(cli.trainer.checkpoint_callback.best_model_path, device="cpu")
    assert captioner.caption(sorted((scenes_source / "Images").iterdir())[0])[0]


def test_a_decoder_that_attends_refuses_an_encoder_without_a_grid(scenes_source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            tiny_args(
                "fit",
                scenes_source,
                tmp_path / "work",
                tmp_path,
                "--config",
                overlay(
                    tmp_path,
                    {"class_path": "tests.plugins.TinyConvEncoder", "init_args": {"pooled_only": True}},
                    ATTENTION,
                ),
            )
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "AttentionDecoder attends over a grid of regions, but TinyConvEncoder" in error
    assert "Traceback" not in error and not list((tmp_path / "work").glob("features/*"))  # nothing half-written


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TorchvisionEncoder("resnet5000", None), r"Unknown torchvision model 'resnet5000'"),
        (lambda: TorchvisionEncoder("resnet18", "IMAGENET9K"), r"Unknown weights 'IMAGENET9K' for resnet18"),
        (lambda: TimmEncoder("not_a_timm_model", pretrained=False), r"Unknown timm model 'not_a_timm_model'"),
        (lambda: OpenClipEncoder("ViT-Q-99", None), r"Unknown OpenCLIP model 'ViT-Q-99'"),
        (lambda: OpenClipEncoder("ViT-B-32", "no-such-tag"), r"Unknown pretrained tag 'no-such-tag'"),
        (lambda: HuggingFaceEncoder(config={"model_type": "no-such-type"}), r"does not know the model type"),
    ],
)
def test_an_unknown_model_name_is_one_clear_message(build, message):
    with pytest.raises(CaptionerError, match=message):
        build()


def test_a_missing_extra_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(CaptionerError, match=r"TimmEncoder needs the timm package.*pip install 'captioner\[timm\]'"):
        TimmEncoder("resnet18", pretrained=False)


def test_offline_weights_name_the_cache_to_seed(monkeypatch, tmp_path):
    """As on a machine without network: the hub client offline (conftest), torchvision's download refused (no
    request is made from this test)."""
    import urllib.error

    import torch.hub

    encoder = TimmEncoder("resnet18.a1_in1k", pretrained=True)  # building needs no network
    with pytest.raises(CaptionerError, match=r"Could not fetch timm/resnet18.a1_in1k.*models--timm--resnet18.a1_in1k"):
        encoder.load_pretrained()

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(CaptionerError, match=r"Without network access, copy .*resnet18-f37072fd.pth"):
        TorchvisionEncoder("resnet18", "IMAGENET1K_V1").load_pretrained()


def test_the_removed_data_backbone_option_says_what_to_write(scenes_source, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(tiny_args("fit", scenes_source, tmp_path / "work", tmp_path, "--data.backbone", "resnet34"))
    error = capsys.readouterr().err
    assert "--data.backbone" in error and "class_path: captioner.encoders.TorchvisionEncoder" in error
    assert "model: resnet34" in error


def test_each_library_gives_its_own_input_definition():
    """The encoder's preprocessing comes from its library, not a table of ours (and the grid shape from a pass)."""
    vit = TimmEncoder("test_vit", pretrained=False)  # timm's pretrained_cfg: 160 px, crop_pct 0.95, bicubic, 0.5
    assert vit.preprocessing == Preprocessing(160, "shorter", "bicubic", True, (0.5,) * 3, (0.5,) * 3, 168)
    assert vit.grid_shape == (10, 10)
    squash = TimmEncoder("test_vit", pretrained=False, resize="squash", image_size=64)
    assert squash.preprocessing.resize == "squash" and squash.grid_shape == (4, 4)
    clip = OpenClipEncoder("ViT-B-32", None)  # OpenCLIP's preprocess_cfg: CLIP's mean and std, bicubic, centre crop
    assert clip.preprocessing.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert (clip.preprocessing.resize, clip.preprocessing.interpolation, clip.grid_shape) == (
        "shorter",
        "bicubic",
        (7, 7),
    )
    library = TorchvisionEncoder("resnet18", "IMAGENET1K_V1", resize="library")  # the weights' transforms()
    assert (library.preprocessing.image_size, library.preprocessing.resize_size) == (224, 256)
    hf = HuggingFaceEncoder(
        config=TINY_CLIP,
        image_processor={
            "size": {"shortest_edge": 40},
            "crop_size": {"height": 32, "width": 32},
            "do_center_crop": True,
            "resample": 3,
            "image_mean": [0.1, 0.2, 0.3],
            "image_std": [0.4, 0.5, 0.6],
        },
    )
    assert hf.preprocessing == Preprocessing(32, "shorter", "bicubic", True, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 40)
    assert hf.feature_dim == 24 and hf.grid_shape == (4, 4)  # tokens through CLIP's projection, like the pooled output


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("resize", ["squash", "shorter"])
def test_numpy_preprocessing_is_within_one_grey_level_of_torchs(resize, interpolation):
    """The torch-free runtime computes every definition the encoders use, on real photographs, shrinking and
    enlarging."""
    for name, size in (("astronaut.png", 224), ("coffee.png", 96), ("camera.png", 600)):
        image = Image.open(SAMPLE_DATA / name).convert("RGB")
        preprocessing = Preprocessing(
            size, resize, interpolation, resize_size=size + 16 if resize == "shorter" else None
        )
        expected = preprocessing.from_pil(image).numpy().astype(int)
        actual = preprocess_array(np.asarray(image), preprocessing.to_dict()).astype(int)
        assert actual.shape == expected.shape == (3, size, size)
        assert np.abs(actual - expected).max() <= 1, (name, size)


@pytest.mark.slow
def test_fine_tuning_trains_the_last_blocks_from_images_and_leaves_the_rest(scenes_source, tmp_path):
    start = main(tiny_args("fit", scenes_source, tmp_path / "work", tmp_path / "frozen"))
    frozen = last_checkpoint(start.trainer)
    before = {k: v.clone() for k, v in start.model.encoder.state_dict().items()}
    cli = main(
        tiny_args(
            "fit",
            scenes_source,
            tmp_path / "work",
            tmp_path / "tuned",
            "--model.trainable_encoder_blocks",
            "2",
            "--model.init_checkpoint",
            frozen,
            "--model.encoder_lr",
            "0.01",
        )
    )
    assert cli.datamodule.needs.online_features  # linked: a trained encoder's features are never cached
    assert "images" in cli.datamodule.datasets["train"].__getitems__([0, 1])
    after = cli.model.encoder.state_dict()
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= {"layer3", "layer4"}  # resnet18's last two blocks, and nothing else
    # Batch norm statistics never move, even in the trained blocks.
    assert all(torch.equal(before[k], after[k]) for k in before if "running_" in k)
    tuned = Captioner.from_checkpoint(last_checkpoint(cli.trainer), device="cpu")
    assert torch.equal(
        tuned.model.encoder.state_dict()["net.layer4.0.conv1.weight"], after["net.layer4.0.conv1.weight"]
    )
