"""Parts from the config alone: a decoder from outside the package, the Transformer end to end, checkpoints."""

import functools
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.cli import main
from captioner.core import parts
from captioner.core.errors import CaptionerError
from captioner.decoding import DecodingConfig
from captioner.encoders.torchvision_models import TorchvisionEncoder
from captioner.models import captioning
from captioner.models.decoders import LSTMDecoder
from captioner.models.module import CaptionModel
from captioner.runs import run_dir
from captioner.text.words import Vocabulary
from tests.conftest import predict_args, tiny_args

PLUGIN = ("--model.decoder", "tests.plugins.GRUDecoder", "--model.decoder.hidden_dim", "32")
TRANSFORMER = (
    "--model.decoder",
    "captioner.models.decoders.TransformerDecoder",
    "--model.decoder.width",
    "32",
    "--model.decoder.layers",
    "1",
    "--model.decoder.heads",
    "2",
    "--model.encoder.image_size",
    "64",
)


def photos_of(scenes: Path, folder: Path, count: int = 3) -> Path:
    folder.mkdir()
    for image in sorted((scenes / "Images").iterdir())[:count]:
        (folder / image.name).write_bytes(image.read_bytes())
    return folder


def test_a_decoder_from_a_test_file_trains_tests_and_predicts_by_class_path_alone(scenes, tmp_path, monkeypatch):
    cli = main(tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.max_epochs", "2", *PLUGIN))
    assert type(cli.model.decoder).__name__ == "GRUDecoder" and cli.datamodule.needs.features == "pooled"
    best = cli.trainer.checkpoint_callback.best_model_path
    meta = torch.load(best, weights_only=True)["captioner"]
    assert meta["decoder"] == {
        "class_path": "tests.plugins.GRUDecoder",
        "init_args": {"hidden_dim": 32, "dropout": 0.1},
    }

    tested = main(tiny_args("test", scenes, tmp_path / "work", tmp_path / "test", "--ckpt_path", best, *PLUGIN))
    report = json.loads((run_dir(tested.trainer) / "test_metrics.json").read_text())
    assert report["images"] == 20 and report["metrics"]["pycocoevalcap"]["BLEU-1"] > 0

    photos = photos_of(scenes, tmp_path / "photos")
    predicted = main(predict_args(best, photos, tmp_path / "pred", *PLUGIN))
    rows = (run_dir(predicted.trainer) / "predictions.jsonl").read_text().splitlines()
    rows = [json.loads(row) for row in rows]
    assert len(rows) == 3 and all(row["error"] is None and isinstance(row["caption"], str) for row in rows)
    # The checkpoint alone names the plugin decoder; a process that did not train it imports it only when allowed.
    monkeypatch.setattr(parts, "_allowed", set())
    with pytest.raises(CaptionerError, match=r"'tests\.plugins\.GRUDecoder'.*--allow_module tests"):
        Captioner.from_checkpoint(best, device="cpu")
    monkeypatch.setenv("CAPTIONER_ALLOW_MODULES", "tests")
    captions = Captioner.from_checkpoint(best, device="cpu").caption(sorted(photos.iterdir()))
    assert captions == [row["caption"] for row in sorted(rows, key=lambda row: row["image"])]


def test_a_checkpoint_of_another_decoder_size_is_refused_naming_the_difference(scenes, tmp_path, capsys):
    cli = main(tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.max_epochs", "1", *PLUGIN))
    best = cli.trainer.checkpoint_callback.best_model_path
    with pytest.raises(SystemExit) as exit_info:
        main(
            tiny_args(
                "test",
                scenes,
                tmp_path / "work",
                tmp_path / "t",
                "--ckpt_path",
                best,
                *PLUGIN[:2],
                "--model.decoder.hidden_dim",
                "16",
            )
        )
    assert exit_info.value.code == 2 and "hidden_dim=32 (configured: 16)" in capsys.readouterr().err
    # A training-only option (dropout) may differ: the weights mean the same.
    main(
        tiny_args(
            "test",
            scenes,
            tmp_path / "work",
            tmp_path / "t2",
            "--ckpt_path",
            best,
            *PLUGIN,
            "--model.decoder.dropout",
            "0.5",
        )
    )


def test_the_transformer_trains_and_its_cross_attention_feeds_the_attention_pictures(scenes, tmp_path):
    cli = main(tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.max_epochs", "2", *TRANSFORMER))
    assert cli.datamodule.needs.features == "grid"
    best = cli.trainer.checkpoint_callback.best_model_path
    photos = photos_of(scenes, tmp_path / "photos")
    predicted = main(
        predict_args(best, photos, tmp_path / "pred", "--predictions.attention_maps", "true", *TRANSFORMER)
    )
    folder = run_dir(predicted.trainer)
    for row in map(json.loads, (folder / "predictions.jsonl").read_text().splitlines()):
        with Image.open(folder / "attention" / (Path(row["image"]).name + ".png")) as figure:
            panels = 1 + len(row["caption"].split()) + 1  # the input, each word, <end>
            assert figure.width == 160 * min(5, panels)


def test_blind_hides_the_image():
    torch.manual_seed(0)
    vocabulary = Vocabulary([f"w{i}" for i in range(30)], max_length=8)
    models = {}
    for blind in (False, True):
        model = CaptionModel(
            functools.partial(LSTMDecoder, embed_dim=8, hidden_dim=16),
            encoder=TorchvisionEncoder("resnet18", None, 32),
            blind=blind,
        )
        model.build(vocabulary)
        models[blind] = model.eval()
    models[True].load_state_dict(models[False].state_dict())  # the same weights; only the flag differs
    features = torch.randn(8, 512) * 5
    blind_tokens = captioning.decode_features(models[True], features, DecodingConfig(num_beams=2)).best_tokens
    assert (blind_tokens == blind_tokens[0]).all()  # one caption for every image: nothing of the image gets in
    seeing = captioning.decode_features(models[False], features, DecodingConfig(num_beams=2)).best_tokens
    assert not (seeing == seeing[0]).all()
