"""A resumed run is the same run: one folder, one W&B run id, the model the uninterrupted run trains."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TESTS, tiny_args, wandb_logger_args
from tests.wandb_log import history_rows

ROOT = TESTS.parent
EPOCHS = "4"


def run(args, cwd, expect=0):
    # W&B's offline writer flushes on a timer (15 s by default): flush often, so what a SIGKILL interrupts is on disk.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL": "0.2"}  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "captioner", *args], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == expect, result.stderr[-4000:]
    return result


def fit_args(scenes, root, *extra):
    return [*tiny_args("fit", scenes, root / "work", root, "--trainer.max_epochs", EPOCHS, *extra),
            *wandb_logger_args(root / "runs")]  # fmt: skip


def history_steps(save_dir: Path) -> tuple[set[str], list[int]]:
    """The run ids of the offline W&B folders and every trainer/global_step their histories log (train/loss rows)."""
    ids, steps = set(), []
    for folder in sorted((save_dir / "wandb").glob("offline-run-*")):
        ids.add(folder.name.rsplit("-", 1)[-1])
        steps += [int(row["trainer/global_step"]) for row in history_rows(next(folder.glob("*.wandb")))
                  if "train/loss" in row]  # fmt: skip
    return ids, steps


@pytest.mark.slow
def test_a_run_killed_after_its_second_epoch_resumes_into_the_same_run_and_model(scenes, tmp_path):
    whole = tmp_path / "whole"
    run(fit_args(scenes, whole), tmp_path)

    broken = tmp_path / "broken"
    kill = ["--trainer.callbacks+=tests.plugins.SignalAt", "--trainer.callbacks.init_args.epoch_start", "2",
            "--trainer.callbacks.init_args.delay_s", "2"]  # fmt: skip
    run(fit_args(scenes, broken, *kill), tmp_path, expect=-9)  # SIGKILL: nothing ran after it
    result = run(fit_args(scenes, broken, "--ckpt_path", "last"), tmp_path)
    assert "Resuming run" in result.stderr

    (whole_run,) = (whole / "runs" / "captioner-test").iterdir()
    (broken_run,) = (broken / "runs" / "captioner-test").iterdir()  # one run folder, not two
    finals = [torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True) for folder in (whole_run, broken_run)]
    assert finals[0]["global_step"] == finals[1]["global_step"] > 0
    for key, value in finals[0]["state_dict"].items():
        assert torch.equal(value, finals[1]["state_dict"][key]), key  # bit-identical weights
    assert (broken_run / "config.yaml").is_file() and list(broken_run.glob("config.resumed-*.yaml"))
    (resume,) = [json.loads(line) for line in (broken_run / "resumes.jsonl").read_text().splitlines()]
    assert resume["same_run"] and resume["epoch"] == 2 and resume["checkpoint"].endswith("last.ckpt")

    ids, steps = history_steps(broken / "runs")
    assert ids == {broken_run.name}  # W&B writes each offline session to its own folder, under the one run id
    assert len(steps) == len(set(steps))  # each step once
    assert sorted(steps) == sorted(history_steps(whole / "runs")[1])  # and the same steps as the whole run


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_a_last_checkpoint_that_resumes(scenes, tmp_path):
    stop = ["--trainer.callbacks+=tests.plugins.SignalAt", "--trainer.callbacks.init_args.signal_name", "SIGTERM",
            "--trainer.callbacks.init_args.step", "5"]  # fmt: skip
    args = tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.max_epochs", "2")
    result = run([*args, *stop], tmp_path, expect=143)
    assert "Stopped on request" in result.stderr and "Traceback" not in result.stderr
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 5  # the step it stopped after
    result = run([*args, "--ckpt_path", "last"], tmp_path)
    assert "Resuming run" in result.stderr
    assert torch.load(last, weights_only=True)["global_step"] > 5


def test_a_copied_checkpoint_starts_a_new_run_and_says_so(trained, scenes_source, tmp_path):
    checkpoint, work = trained
    copy = tmp_path / "elsewhere" / "copied.ckpt"
    copy.parent.mkdir()
    copy.write_bytes(Path(checkpoint).read_bytes())
    result = run(tiny_args("fit", scenes_source, work, tmp_path / "new", "--ckpt_path", str(copy),
                           "--trainer.max_epochs", "5"), tmp_path)  # fmt: skip
    assert "not inside the run folder that wrote it" in result.stderr and "new run" in result.stderr
    assert list((tmp_path / "new").rglob("last.ckpt"))
