"""DDP on CPU (gloo) with 2 processes: fit, exact test metrics across ranks, predict writes each file once."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import TESTS, predict_args, tiny_args

ROOT = TESTS.parent


def run(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "captioner", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def ddp(processes):
    return ["--trainer.strategy", "ddp", "--trainer.devices", str(processes), "--trainer.accelerator", "cpu"]


@pytest.mark.slow
def test_two_processes_fit_test_and_predict_like_one(scenes, tmp_path):
    work = tmp_path / "work"
    run([*tiny_args("fit", scenes, work, tmp_path / "fit", "--trainer.max_epochs", "6"), *ddp(2)], tmp_path)
    (checkpoint,) = (tmp_path / "fit").rglob("last.ckpt")
    (cache,) = (work / "features").iterdir()
    assert (cache / "index.json").is_file() and not (cache / "parts").exists()  # shared extraction, assembled

    reports = {}
    for processes in (1, 2):
        root = tmp_path / f"test{processes}"
        run([*tiny_args("test", scenes, work, root, "--ckpt_path", str(checkpoint)), *ddp(processes)], tmp_path)
        (report,) = root.rglob("test_metrics.json")
        reports[processes] = json.loads(report.read_text())
        captions = [json.loads(line) for line in (report.parent / "test_captions.jsonl").read_text().splitlines()]
        assert len(captions) == 20 and len({row["file_name"] for row in captions}) == 20
    assert reports[1]["images"] == reports[2]["images"] == 20
    assert reports[1]["metrics"] == reports[2]["metrics"]
    assert reports[1]["metrics"]["torchmetrics"]["BLEU-1"] > 0

    photos = tmp_path / "photos"
    photos.mkdir()
    for image in sorted((scenes / "Images").iterdir())[:9]:  # odd: the ranks get 5 and 4
        shutil.copy(image, photos / image.name)
    result = run([*predict_args(checkpoint, photos, tmp_path / "pred"), *ddp(2)], tmp_path)
    assert "9 captioned, 0 failed" in result.stdout
    (predictions,) = (tmp_path / "pred").rglob("predictions.jsonl")
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert sorted(row["path"].rsplit("/", 1)[-1] for row in rows) == sorted(p.name for p in photos.iterdir())
