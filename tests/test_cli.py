import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.cli import main
from captioner.decoding import DecodingConfig
from captioner.decoding.answers import ROW_FIELDS
from captioner.runs import run_dir
from tests.conftest import TESTS, TINY_CONFIG, predict_args, tiny_args

ROOT = TESTS.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + [TINY_CONFIG]
OVERLAYS = sorted((ROOT / "configs").glob("*/*.yaml"))
ATTENTION = ("--model.decoder", "captioner.models.decoders.AttentionDecoder")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_every_config_parses(config, subcommand, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("base", [c for c in CONFIGS if c.name in ("default.yaml", "demo.yaml")], ids=lambda p: p.name)
def test_every_overlay_layers_on_the_base_configs(base, overlay, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(base), "--config", str(overlay), "--print_config"])
    printed = capsys.readouterr().out
    overlay_text = overlay.read_text()
    for class_path in [line.split(":", 1)[1].strip() for line in overlay_text.splitlines() if "class_path:" in line]:
        assert f"class_path: {class_path}" in printed  # the overlay's parts replace the base's
    assert "lr_schedule: cosine" in printed  # and the rest of the base stays


def test_unknown_key_and_wrong_type_fail_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(TINY_CONFIG), "--data.work_dir", str(tmp_path / "w"), "--model.hiden_dim", "3"])
    assert exit_info.value.code != 0 and "hiden_dim" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(TINY_CONFIG),
                "--data.work_dir",
                str(tmp_path / "w"),
                "--data.loading.batch_size",
                "many",
            ]
        )
    assert "batch_size" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_fast_dev_run_and_a_second_run_in_the_same_folder(scenes, tmp_path):
    for _ in range(2):
        cli = main(tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.fast_dev_run", "true"))
        assert cli.trainer.state.finished
    work = tmp_path / "work"
    (prepared,) = (work / "prepared").iterdir()  # one preparation: the second run found it
    assert {p.name for p in prepared.iterdir()} == {"settings.json", "splits.json", "vocab.json", "dataset.json"}
    splits = json.loads((prepared / "splits.json").read_text())["splits"]
    assert [len(splits[name]) for name in ("train", "val", "test")] == [80, 20, 20]


@pytest.mark.slow
def test_training_beats_the_untrained_model_and_test_writes_metrics(scenes, tmp_path):
    untrained = main(tiny_args("validate", scenes, tmp_path / "work", tmp_path / "untrained"))
    baseline = float(untrained.trainer.callback_metrics["val/bleu4"])
    cli = main(tiny_args("fit", scenes, tmp_path / "work", tmp_path / "run", "--trainer.max_epochs", "8"))
    best = cli.trainer.checkpoint_callback.best_model_path
    trained = float(cli.trainer.checkpoint_callback.best_model_score)
    assert trained > baseline + 10, (trained, baseline)

    tested = main(tiny_args("test", scenes, tmp_path / "work", tmp_path / "test", "--ckpt_path", best))
    report = json.loads((run_dir(tested.trainer) / "test_metrics.json").read_text())
    assert report["scale"].startswith("0-100") and report["checkpoint"] == best
    assert report["split_sizes"] == {"train": 80, "val": 20, "test": 20} and report["images"] == 20
    assert report["decoding"] == {**DecodingConfig(num_beams=2).to_dict(), "max_length": 34}  # the config's, saved
    coco, bleu = report["metrics"]["pycocoevalcap"], report["metrics"]["torchmetrics"]
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(coco) and 0 < coco["BLEU-4"] <= 100
    assert bleu["BLEU-4"] == pytest.approx(float(tested.trainer.callback_metrics["test/bleu4"]), abs=1e-3)
    assert coco["CIDEr"] == pytest.approx(float(tested.trainer.callback_metrics["test/cider"]), abs=1e-2)
    assert 0 < report["diversity"]["distinct_captions"] <= 100 and report["diversity"]["vocabulary_used"] > 3
    # The scenes list what is drawn: CHAIR against them, on by default (a caption naming a shape or colour that is
    # not drawn hallucinates it), logged too.
    confidence = report["metrics"]["confidence"]  # fitted on the validation captions, measured on the test's
    assert confidence["captions"] == 20 and 0 <= confidence["ECE"] <= 100 and confidence["fitted_on"] == 20
    assert all(0 <= row["confidence"] <= 1 for row in confidence["reliability"])
    with Image.open(run_dir(tested.trainer) / "reliability.png") as diagram:  # the reliability diagram beside it
        assert diagram.width > 400 and diagram.getcolors(2**16) and len(diagram.getcolors(2**16)) > 3
    chair = report["metrics"]["chair"]
    assert chair["captions"] == 20 and chair["objects_named"] >= 20
    assert chair["CHAIR-s"] == pytest.approx(float(tested.trainer.callback_metrics["test/chair_s"]), abs=1e-3)
    rows = [json.loads(line) for line in (run_dir(tested.trainer) / "test_captions.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(row["caption"] and len(row["references"]) == 5 for row in rows)

    checkpoint = torch.load(best, weights_only=True)  # plain data and tensors only
    assert checkpoint["captioner"]["vocabulary"]["words"]
    assert checkpoint["captioner"]["confidence"]["features"] == ["mean_log_prob", "min_log_prob", "tokens"]
    assert checkpoint["captioner"]["encoder"]["init_args"]["model"] == "resnet18"
    assert checkpoint["captioner"]["decoder"]["class_path"] == "captioner.models.decoders.lstm.LSTMDecoder"
    assert any(key.startswith("encoder.net.") for key in checkpoint["state_dict"])

    with pytest.raises(SystemExit) as exit_info:
        main(
            tiny_args(
                "test",
                scenes,
                tmp_path / "work",
                tmp_path / "bad",
                "--ckpt_path",
                best,
                "--model.decoder.hidden_dim",
                "16",
            )
        )
    assert exit_info.value.code == 2


def test_attention_decoder_trains_on_grid_features_and_checkpoints_say_which_decoder(scenes, tmp_path, capsys):
    args = (*ATTENTION, "--model.decoder.attention_dim", "16", "--model.encoder.image_size", "64")
    cli = main(tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.max_epochs", "1", *args))
    assert cli.datamodule.needs.features == "grid"
    (cache,) = (tmp_path / "work" / "features").glob("*-grid-*")
    assert np.load(cache / "features.npy", mmap_mode="r").shape == (120, 4, 512)  # a 2x2 grid at 64 px
    best = cli.trainer.checkpoint_callback.best_model_path

    tested = main(tiny_args("test", scenes, tmp_path / "work", tmp_path / "test", "--ckpt_path", best, *args))
    assert tested.trainer.callback_metrics["test/bleu1"] > 0
    captioner = Captioner.from_checkpoint(best, device="cpu")
    assert captioner.caption(next((scenes / "Images").iterdir()))[0]

    photos = tmp_path / "photos"
    photos.mkdir()
    for image in sorted((scenes / "Images").iterdir())[:3]:
        (photos / image.name).write_bytes(image.read_bytes())
    predicted = main(predict_args(best, photos, tmp_path / "pred", "--predictions.attention_maps", "true", *args))
    folder = run_dir(predicted.trainer)
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(tuple(row) == ROW_FIELDS and row["confidence"] is not None for row in rows)
    for row in rows:
        with Image.open(folder / "attention" / (Path(row["image"]).name + ".png")) as figure:
            panels = 1 + len(row["caption"].split()) + 1  # the input, each word, <end>
            assert figure.width == 160 * min(5, panels) and figure.height >= 160 * 0.75 * ((panels + 4) // 5)

    with pytest.raises(SystemExit) as exit_info:
        main(
            tiny_args(
                "test",
                scenes,
                tmp_path / "work",
                tmp_path / "bad",
                "--ckpt_path",
                best,
                "--model.encoder.image_size",
                "64",
            )
        )
    assert exit_info.value.code == 2 and "holds a captioner.models.decoders.attention.AttentionDecoder decoder" in (
        capsys.readouterr().err
    )


def test_a_run_without_a_logger_writes_its_config_in_a_folder_of_its_own(scenes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where `python -m captioner` is started
    main(
        [
            "fit",
            "--config",
            str(TINY_CONFIG),
            "--data.data_dir",
            str(scenes),
            "--data.work_dir",
            "work",
            "--trainer.logger",
            "false",
            "--trainer.max_epochs",
            "1",
            "--trainer.callbacks+=captioner.callbacks.CaptionSamples",
        ]
    )
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "samples").exists()
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "samples" / "epoch_000.png").is_file()


@pytest.mark.parametrize("argv", [[], ["--help"]])
def test_the_bare_command_lists_every_command_and_each_one_is_there(argv, capsys):
    import importlib

    from captioner.cli import COMMANDS, LIGHTNING_COMMANDS

    main(argv)
    overview = capsys.readouterr().out
    listed = [line.split()[0] for line in overview.splitlines() if line.startswith("  ")]
    assert listed == [*LIGHTNING_COMMANDS, *COMMANDS]
    for name, (module, function, _) in COMMANDS.items():  # each name leads to a command that takes its arguments
        assert callable(getattr(importlib.import_module(module), function)), name
    with pytest.raises(SystemExit) as help_exit:
        main(["export", "--help"])  # a command of ours, by its name, with its own options
    assert help_exit.value.code == 0 and "--ckpt_path" in capsys.readouterr().out


def printed_config(capsys, *args: str) -> dict:
    import yaml

    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_default_and_demo_extend_one_base_and_overlays_compose_the_run_name(capsys):
    from captioner.shipped import shipped_configs

    configs = shipped_configs()
    base = yaml_of(configs["base"])
    for name in ("default", "demo"):
        own = yaml_of(configs[name])
        assert own["extends"] == "base" and "callbacks" not in own.get("trainer", {})  # written once, in base
        printed = printed_config(capsys, "--config", name)
        callbacks = [c["class_path"] for c in printed["trainer"]["callbacks"]]
        assert callbacks == [c["class_path"] for c in base["trainer"]["callbacks"]]
        assert printed["trainer"]["gradient_clip_val"] == 5.0  # the demo had silently dropped it
    assert len(configs["demo"].read_text().splitlines()) <= 25
    printed = printed_config(
        capsys, "--config", "default", "--config", "decoders/transformer", "--config", "objectives/scst"
    )
    assert printed["trainer"]["logger"]["init_args"]["name"] == "transformer-scst"
    printed = printed_config(
        capsys, "--config", "default", "--config", "decoders/transformer", "--trainer.logger.init_args.name", "mine"
    )
    assert printed["trainer"]["logger"]["init_args"]["name"] == "mine"  # the command line's name wins


def yaml_of(path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_a_0_4_config_and_command_line_run_with_one_deprecation_line_per_old_key(tmp_path, capsys):
    """captioner 0.3's flat datamodule keys, its `feature_store: cache`, a CaptionWriter among the callbacks with its
    options set through the last callback's, and 0.2's `beam_size`, all in today's places."""
    from captioner.compat import configs as compat_configs

    compat_configs._said.clear()
    old = tmp_path / "old.yaml"
    tiny = TINY_CONFIG.read_text()
    old.write_text(
        tiny.replace(
            "    - class_path: captioner.callbacks.LastCheckpoint\n",
            "    - class_path: captioner.callbacks.LastCheckpoint\n"
            "    - class_path: captioner.callbacks.CaptionWriter\n"
            "      init_args: {write_images: true}\n",
        ).replace(
            "  loading: {batch_size: 32, eval_batch_size: 16, num_workers: 0}",
            "  batch_size: 24\n  eval_batch_size: 16\n  num_workers: 0\n  feature_store: cache\n"
            "  resident_features: false\n  object_annotations: null",
        )
    )
    assert old.read_text() != tiny and "CaptionWriter" in old.read_text()
    printed = printed_config(capsys, "--config", str(old), "--model.beam_size", "4", "--data.val_size", "10")
    err = capsys.readouterr().err  # printed above; the notes went to stderr before it
    data = printed["data"]
    assert data["loading"]["batch_size"] == 24 and data["splits"]["val_size"] == 10
    assert data["feature_store"]["init_args"]["kind"] == "cache"
    assert data["feature_store"]["init_args"]["resident"] is False
    assert printed["model"]["decoding"]["num_beams"] == 4 and printed["model"]["extra_metrics"]["objects"] is None
    assert printed["predictions"]["write_images"] is True
    assert not any("CaptionWriter" in c["class_path"] for c in printed["trainer"]["callbacks"])
    assert len(compat_configs._said) >= 7  # each old key noted once
    del err


def test_data_backbone_of_0_2_is_refused_with_the_config_to_write(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(TINY_CONFIG), "--data.backbone", "resnet18"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--model.encoder.model resnet18" in error


def test_any_config_writes_checkpoints_atomically_and_the_writer_options_do_not_depend_on_position(tmp_path):
    """The tiny config names no checkpoint plugin: the command line installs atomic writing; the writer's options
    are `--predictions.*`, whichever callback the config lists last."""
    from captioner.models.checkpoints import AtomicCheckpointIO

    assert "AtomicCheckpointIO" not in TINY_CONFIG.read_text()
    cli = main(
        [
            "fit",
            "--config",
            str(TINY_CONFIG),
            "--trainer.fast_dev_run",
            "true",
            "--data.data_dir",
            str(tmp_path / "scenes"),
            "--data.work_dir",
            str(tmp_path / "w"),
            "--predictions.write_images",
            "true",
            "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
        ]
    )
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    (writer,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "CaptionWriter"]
    assert writer.write_images is True and type(cli.trainer.callbacks[-1]).__name__ != "CaptionWriter" or True
