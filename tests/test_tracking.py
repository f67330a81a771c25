"""W&B offline runs carry the metrics, the config and the sample table; PNG grids exist without W&B."""

import json
import os
import subprocess
import sys

from PIL import Image

from tests.conftest import TESTS, tiny_args, wandb_logger_args
from tests.wandb_log import history_keys, read_records

ROOT = TESTS.parent


def test_a_wandb_run_without_credentials_goes_offline_without_prompting_and_holds_metrics_config_and_samples(
    scenes, tmp_path
):
    """No W&B key anywhere (no variable, no netrc) and no terminal: the run logs offline, says so, and asks nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "no-netrc"), PYTHONPATH=str(ROOT))
    command = [
        sys.executable,
        "-m",
        "captioner",
        *tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.max_epochs", "2"),
        "--trainer.limit_train_batches",
        "3",
        *wandb_logger_args(tmp_path / "runs"),
        "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
        "--trainer.callbacks+=captioner.callbacks.Throughput",
        "--trainer.callbacks+=captioner.callbacks.CaptionSamples",
        "--trainer.callbacks.num_images",
        "4",
        "--trainer.callbacks.columns",
        "2",
        "--trainer.callbacks.tile_width",
        "200",
        "--trainer.callbacks+=captioner.callbacks.RunSummary",
        "--trainer.logger.init_args.log_model",
        "true",  # the tested checkpoint published and linked as an artifact
        "--test_after_fit",
        "true",
    ]
    result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logging offline" in result.stderr
    assert "Run summary" in result.stdout and "best checkpoint:" in result.stdout
    # W&B's two start-up warnings of every run (the anonymous setting, a missing git root) are gone.
    assert "anonymous" not in result.stderr and "git root" not in result.stderr, result.stderr[-3000:]

    (run_file,) = (tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb")
    keys = history_keys(run_file)
    expected = {"train/loss", "val/loss", "train/captions_per_s", "lr-AdamW"} | {f"val/bleu{n}" for n in (1, 2, 3, 4)}
    assert expected <= keys, expected - keys
    config_keys = {
        item.key
        for record in read_records(run_file)
        if record.WhichOneof("record_type") == "config"
        for item in record.config.update
    }
    assert "config" in config_keys  # the full resolved CLI config

    # The published folder (as `publish` writes it) logged as the run's `model` artifact, the card among its files.
    artifacts = {
        record.artifact.name: record.artifact
        for record in read_records(run_file)
        if record.WhichOneof("record_type") == "artifact"
    }
    (published,) = [artifact for name, artifact in artifacts.items() if name.startswith("captioner-")]
    assert published.type == "model"
    files = {entry.path for entry in published.manifest.contents}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= files, files
    (weights,) = (tmp_path / "runs").rglob("published/*/model.safetensors")
    (report,) = (tmp_path / "runs").rglob("test_metrics.json")
    cider = json.loads(report.read_text())["metrics"]["pycocoevalcap"]["CIDEr"]
    assert f"value: {round(cider, 2)}" in (weights.parent / "README.md").read_text()  # the card holds the test's scores

    tables = sorted((run_file.parent / "files" / "media" / "table" / "val").glob("samples_*.table.json"))
    assert len(tables) == 2  # one per validation epoch
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["image", "generated", "references", "epoch"] and len(table["data"]) == 4
    assert all(row[1] and row[2] for row in table["data"])

    run_folder = tmp_path / "runs" / "captioner-test" / run_file.stem.removeprefix("run-")
    grids = sorted((run_folder / "samples").glob("epoch_*.png"))
    assert [g.name for g in grids] == ["epoch_000.png", "epoch_001.png"]
    with Image.open(grids[-1]) as grid:
        assert grid.width == 400 and grid.height > 2 * 200 * 120 / 160
        assert len(set(grid.convert("L").getdata())) > 50  # pictures and text, not a blank canvas
