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
    from captioner.cli import main

    work = tmp_path / "work"
    # Fit, then test the best checkpoint, on two processes; the same test on one (in this process).
    run(
        [
            *tiny_args("fit", scenes, work, tmp_path / "fit", "--trainer.max_epochs", "2", "--test_after_fit", "true"),
            *ddp(2),
        ],
        tmp_path,
    )
    (checkpoint,) = (tmp_path / "fit").rglob("last.ckpt")
    (cache,) = (work / "features").iterdir()
    assert (cache / "index.json").is_file() and not (cache / "parts").exists()  # shared extraction, assembled

    (two,) = (tmp_path / "fit").rglob("test_metrics.json")
    reports = {2: json.loads(two.read_text())}
    best = reports[2]["checkpoint"]
    assert best and "last" not in best
    main(tiny_args("test", scenes, work, tmp_path / "test1", "--ckpt_path", best))
    (one,) = (tmp_path / "test1").rglob("test_metrics.json")
    reports[1] = json.loads(one.read_text())
    for report in (one, two):
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
    assert sorted(row["image"].rsplit("/", 1)[-1] for row in rows) == sorted(p.name for p in photos.iterdir())


@pytest.mark.slow
def test_two_nodes_without_a_shared_file_system_each_build_their_own_cache(scenes, tmp_path):
    """Two 'nodes' (one process each, launched as torchrun/SLURM would) whose work_dirs are different folders."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for node in (0, 1):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "WANDB_MODE": "disabled",
            "TORCHELASTIC_RUN_ID": "test",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(node),
            "GROUP_RANK": str(node),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
        }
        args = tiny_args(
            "fit",
            scenes,
            tmp_path / f"node{node}" / "work",
            tmp_path / f"node{node}",
            "--trainer.max_epochs",
            "1",
            "--data.shared_filesystem",
            "false",
            "--trainer.num_nodes",
            "2",
            *ddp(1),
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "captioner", *args],
                env=env,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for node in (0, 1):
        (cache,) = (tmp_path / f"node{node}" / "work" / "features").iterdir()
        assert (cache / "index.json").is_file() and not (cache / "parts").exists()
