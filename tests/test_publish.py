"""Publishing a trained captioner as the Hub shares models, and loading it back: safetensors weights, config.json,
the tokenizer, a model card the hub's own parser reads with valid metadata, the ONNX export; from_pretrained and
`caption --ckpt_path <folder or id>` caption as the checkpoint does; offline, a hub id names the cache to seed."""

from __future__ import annotations

import json

import pytest

from captioner import Captioner
from captioner.cli import main
from captioner.core.errors import CaptionerError
from tests.conftest import copy_scenes, tiny_args


@pytest.fixture(scope="module")
def tested_run(scenes_source, tmp_path_factory):
    """A tiny model trained then tested: its best checkpoint with a test report beside its run."""
    root = tmp_path_factory.mktemp("publish")
    cli = main(tiny_args("fit", scenes_source, root / "work", root / "run", "--trainer.max_epochs", "3"))
    best = cli.trainer.checkpoint_callback.best_model_path
    return best, root


def test_publish_writes_the_hubs_layout_and_from_pretrained_captions_as_the_checkpoint(
    tested_run, scenes_source, tmp_path, capsys
):
    import safetensors.torch
    from huggingface_hub import ModelCard

    checkpoint, _ = tested_run
    metrics = {"pycocoevalcap": {"BLEU-4": 31.5, "CIDEr": 88.25}, "chair": {"CHAIR-i": 12.0, "CHAIR-s": 20.0}}
    report = {"images": 20, "tokenizer": "PTB", "decoding": {"num_beams": 2}, "metrics": metrics}
    (tmp_path / "test_metrics.json").write_text(json.dumps(report))
    folder = tmp_path / "published"
    main(
        [
            "publish",
            "--ckpt_path",
            checkpoint,
            "--output",
            str(folder),
            "--onnx",
            "--test_metrics",
            str(tmp_path / "test_metrics.json"),
            "--dataset",
            "yerevann/coco-karpathy",
            "--license",
            "mit",
        ]
    )
    assert {p.name for p in folder.iterdir()} == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
        "onnx",
    }
    config = json.loads((folder / "config.json").read_text())
    assert config["captioner_format"] == 1 and config["captioner"]["decoder"]["class_path"].endswith("LSTMDecoder")
    assert json.loads((folder / "tokenizer.json").read_text())["words"]
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    assert any(name.startswith("decoder.") for name in weights) and any(name.startswith("encoder.") for name in weights)
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "image-to-text" and card.data.library_name == "captioner"
    assert card.data.license == "mit" and card.data.datasets == ["yerevann/coco-karpathy"]
    metrics = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert metrics == {"BLEU-4": 31.5, "CIDEr": 88.25, "CHAIR-s": 20.0}
    assert "Captioner.from_pretrained" in card.text and "| CIDEr | 88.25 |" in card.text
    images = sorted((scenes_source / "Images").iterdir())[:6]
    expected = Captioner.from_checkpoint(checkpoint, device="cpu").caption(images)
    assert Captioner.from_pretrained(folder, device="cpu").caption(images) == expected
    from captioner.inference import OnnxCaptioner

    assert OnnxCaptioner(folder / "onnx").caption(images) == expected  # the export in the folder, torch-free
    capsys.readouterr()
    main(["caption", str(images[0]), "--ckpt_path", str(folder)])
    assert capsys.readouterr().out.strip().endswith(expected[0])


def test_publishing_refuses_a_full_folder_and_loading_says_what_is_missing(tested_run, tmp_path, monkeypatch):
    checkpoint, _ = tested_run
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["publish", "--ckpt_path", checkpoint, "--output", str(tmp_path / "full")])
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    with pytest.raises(CaptionerError, match="holds no published captioner"):
        Captioner.from_pretrained(tmp_path / "full")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CaptionerError, match="models--someone--no-such-captioner"):
        Captioner.from_pretrained("someone/no-such-captioner")


def test_the_card_reports_the_speed_measured_and_the_int8_exports_differences(tested_run, scenes_source, tmp_path):
    """`--measure_dir`: the card's speed table from a real measurement on the pictures given (the hardware named),
    and, with `--onnx --quantize int8`, how the int8 export's captions differ from PyTorch's, measured, not assumed."""
    from huggingface_hub import ModelCard

    from captioner.inference import OnnxCaptioner
    from captioner.publish import measure

    checkpoint, _ = tested_run
    pictures = copy_scenes(scenes_source, tmp_path / "pictures", 12)
    folder = tmp_path / "published"
    main(
        [
            "publish",
            "--ckpt_path",
            checkpoint,
            "--output",
            str(folder),
            "--onnx",
            "--quantize",
            "int8",
            "--measure_dir",
            str(pictures),
            "--measure_images",
            "10",
        ]
    )
    assert OnnxCaptioner(folder / "onnx").manifest.quantized["int8"]
    card = ModelCard.load(folder / "README.md").text
    speed = card[card.index("## Speed") : card.index("Decoding saved")]
    assert "10 images" in speed and "| PyTorch | fp32 |" in speed and "| ONNX Runtime | int8 decoder |" in speed
    # The table's agreement is what comparing the two runtimes' captions gives.
    pytorch = Captioner.from_checkpoint(checkpoint, device="cpu").predict(sorted(pictures.iterdir())[:10])
    int8 = OnnxCaptioner(folder / "onnx").predict(sorted(pictures.iterdir())[:10])
    identical = 100 * sum(a.caption == b.caption for a, b in zip(pytorch, int8)) / 10
    assert f"| {identical:.1f} % |" in speed
    measured = measure(Captioner.from_checkpoint(checkpoint, device="cpu").model, sorted(pictures.iterdir())[:4])
    assert measured["images"] == 4 and measured["pytorch"]["images_per_s"] > 0 and "onnx" not in measured
    with pytest.raises(SystemExit):  # int8 quantises the export: without --onnx there is nothing to quantise
        main(["publish", "--ckpt_path", checkpoint, "--output", str(tmp_path / "other"), "--quantize", "int8"])
