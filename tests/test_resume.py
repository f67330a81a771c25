"""A resumed run is the same run: one folder, one W&B run id, the model the uninterrupted run trains."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.cli import main
from tests.conftest import TESTS, tiny_args, wandb_logger_args
from tests.wandb_log import history_rows

ROOT = TESTS.parent
EPOCHS = "4"


# W&B's offline writer flushes on a timer (15 s by default): flush often, so what a SIGKILL interrupts is on disk.
WANDB_OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL": "0.2"}


def run(args, cwd, expect=0):
    # A command of its own, as a user's: not attached to the W&B service a run in this process started.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(PYTHONPATH=str(ROOT), **WANDB_OFFLINE)
    result = subprocess.run(
        [sys.executable, "-m", "captioner", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == expect, result.stderr[-4000:]
    return result


def fit_args(scenes, root, *extra):
    return [
        *tiny_args("fit", scenes, root / "work", root, "--trainer.max_epochs", EPOCHS, *extra),
        *wandb_logger_args(root / "runs"),
    ]


def history_steps(save_dir: Path) -> tuple[set[str], list[int]]:
    """The run ids of the offline W&B folders and every trainer/global_step their histories log (train/loss rows)."""
    ids, steps = set(), []
    for folder in sorted((save_dir / "wandb").glob("offline-run-*")):
        ids.add(folder.name.rsplit("-", 1)[-1])
        steps += [
            int(row["trainer/global_step"]) for row in history_rows(next(folder.glob("*.wandb"))) if "train/loss" in row
        ]
    return ids, steps


# The shipped demo config as users run it (every callback, 2 loader workers, the W&B logger), at small sizes: fewer
# scenes and epochs, a small random encoder at 32 px, smaller decoders, no test at the end. Each variant is killed
# with SIGKILL at a point the test draws, resumed with `--ckpt_path last`, and compared with the uninterrupted run.
DEMO = [
    "--data.origin.synthetic_images",
    "100",
    "--data.splits.val_size",
    "20",
    "--data.splits.test_size",
    "20",
    "--data.loading.batch_size",
    "32",
    "--trainer.max_epochs",
    "3",
    "--test_after_fit",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--model.warmup_steps",
    "5",
    "--model.encoder.model",
    "resnet18",
    "--model.encoder.image_size",
    "32",
]
SMALL_DECODERS = {
    "lstm": ["--model.decoder.embed_dim", "32", "--model.decoder.hidden_dim", "48"],
    "transformer": [
        "--config",
        str(ROOT / "configs" / "decoders" / "transformer.yaml"),
        "--model.decoder.width",
        "32",
        "--model.decoder.layers",
        "1",
        "--model.decoder.heads",
        "2",
        "--model.decoder.ffn_dim",
        "64",
        "--model.warmup_steps",
        "5",
    ],
}
EVERY_4_STEPS = "every_n_train_steps: 4  # e.g. 500"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def demo_args(scenes: Path, root: Path, decoder: str, *extra: str, config: Path = DEMO_CONFIG) -> list[str]:
    return [
        "fit",
        "--config",
        str(config),
        *DEMO,
        *SMALL_DECODERS[decoder],
        "--data.data_dir",
        str(scenes),
        "--data.work_dir",
        str(root.parent / "work"),
        "--trainer.logger.init_args.save_dir",
        str(root / "runs"),
        *extra,
    ]


def every_4_steps(tmp_path: Path) -> Path:
    """The shipped demo config over a copy of the base it extends with `LastCheckpoint(every_n_train_steps=4)`, as
    its comment suggests for long epochs (`extends: base` finds the copy beside it first)."""
    base = tmp_path / "base.yaml"
    base.write_text(
        (DEMO_CONFIG.parent / "base.yaml").read_text().replace("every_n_train_steps: null  # e.g. 500", EVERY_4_STEPS)
    )
    assert EVERY_4_STEPS in base.read_text()
    config = tmp_path / "demo-every-4-steps.yaml"
    config.write_text(DEMO_CONFIG.read_text())
    return config


def killed_and_resumed(
    scenes: Path,
    tmp_path: Path,
    decoder: str,
    kill: list[str],
    *extra: str,
    config: Path = DEMO_CONFIG,
    in_process: bool = False,
    wandb: pytest.MonkeyPatch | None = None,
) -> tuple[Path, Path]:
    """The uninterrupted run's folder, and the folder of the run killed by `kill` and resumed.

    The killed run is a process of its own (SIGKILL) with W&B offline. With `in_process` the two others run in this
    one (the same code and threads, without a process's start-up), with W&B off, or offline too when `wandb` (a
    monkeypatch to set its variables with) is given.
    """
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    if wandb is not None:
        for name, value in WANDB_OFFLINE.items():
            wandb.setenv(name, value)
        wandb.delenv("WANDB_SERVICE", raising=False)  # the service W&B starts here is forgotten when the test ends
    launch = (lambda args: main(args)) if in_process else (lambda args: run(args, tmp_path))
    launch(demo_args(scenes, whole, decoder, *extra, config=config))
    killer = ["--trainer.callbacks+=tests.plugins.SignalAt", *kill, "--trainer.callbacks.init_args.delay_s", "1"]
    run(demo_args(scenes, broken, decoder, *extra, *killer, config=config), tmp_path, expect=-9)  # SIGKILL
    launch(demo_args(scenes, broken, decoder, *extra, "--ckpt_path", "last", config=config))
    (whole_run,) = (whole / "runs" / "captioner-demo").iterdir()
    (broken_run,) = (broken / "runs" / "captioner-demo").iterdir()  # one run folder, not two
    return whole_run, broken_run


def assert_same_model(whole_run: Path, broken_run: Path) -> None:
    finals = [torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True) for folder in (whole_run, broken_run)]
    assert finals[0]["global_step"] == finals[1]["global_step"] > 0
    for key, value in finals[0]["state_dict"].items():
        assert torch.equal(value, finals[1]["state_dict"][key]), key  # bit-identical weights
    (resume,) = [json.loads(line) for line in (broken_run / "resumes.jsonl").read_text().splitlines()]
    assert resume["same_run"] and resume["checkpoint"].endswith("last.ckpt")


@pytest.fixture(scope="module")
def demo_scenes(tmp_path_factory) -> Path:
    from captioner.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("demo") / "scenes", num_images=100, seed=3)


@pytest.mark.slow
def test_the_demo_config_killed_at_an_epoch_boundary_resumes_into_the_same_run_and_model(
    demo_scenes, tmp_path, monkeypatch
):
    # Two epochs, killed as the second starts (after the first epoch's checkpoint).
    kill = ["--trainer.callbacks.init_args.epoch_start", "1"]
    whole_run, broken_run = killed_and_resumed(
        demo_scenes, tmp_path, "lstm", kill, "--trainer.max_epochs", "2", in_process=True, wandb=monkeypatch
    )
    assert_same_model(whole_run, broken_run)
    assert (broken_run / "config.yaml").is_file() and list(broken_run.glob("config.resumed-*.yaml"))
    ids, steps = history_steps(tmp_path / "broken" / "runs")
    assert ids == {broken_run.name}  # W&B writes each offline session to its own folder, under the one run id
    assert len(steps) == len(set(steps))  # each step once
    assert sorted(steps) == sorted(history_steps(tmp_path / "whole" / "runs")[1])  # and the same steps as the whole run


@pytest.mark.slow
def test_the_transformer_killed_mid_epoch_resumes_from_the_next_batch_to_the_same_model(demo_scenes, tmp_path):
    """`LastCheckpoint(every_n_train_steps)` set: the resume continues from the batch after the last save.

    A recurrent decoder killed mid-epoch and resumed:
    `test_self_critical_training_killed_mid_epoch_resumes_to_the_same_model` (the pooled LSTM). The attention LSTM
    saves and resumes through the same parameters, optimizer and loader state, so it is not run a third time.
    """
    # 60 training images x 5 captions in batches of 32, two epochs: 9 steps an epoch, saves at steps 4, 8, 9 (epoch
    # end), 12, 16 and 18. Killed a step or two after a mid-epoch save, so the resume starts mid-epoch.
    step = random.Random("transformer").choice([5, 6, 13, 14, 17])
    whole_run, broken_run = killed_and_resumed(
        demo_scenes,
        tmp_path,
        "transformer",
        ["--trainer.callbacks.init_args.step", str(step)],
        "--trainer.max_epochs",
        "2",
        config=every_4_steps(tmp_path),
        in_process=True,
    )
    assert_same_model(whole_run, broken_run)
    (resume,) = [json.loads(line) for line in (broken_run / "resumes.jsonl").read_text().splitlines()]
    assert resume["global_step"] == step - step % 4 and resume["global_step"] % 9  # the last save, mid-epoch


@pytest.mark.slow
def test_self_critical_training_killed_mid_epoch_resumes_to_the_same_model(demo_scenes, tmp_path):
    start = tmp_path / "start"
    main(demo_args(demo_scenes, start, "lstm", "--trainer.max_epochs", "1"))
    (checkpoint,) = start.rglob("last.ckpt")
    scst = [
        "--config",
        str(ROOT / "configs" / "objectives" / "scst.yaml"),
        "--model.init_checkpoint",
        str(checkpoint),
        "--model.objective.samples",
        "2",
        "--data.loading.batch_size",
        "8",
        "--trainer.max_epochs",
        "2",
    ]
    kill = ["--trainer.callbacks.init_args.step", "10"]
    whole_run, broken_run = killed_and_resumed(
        demo_scenes, tmp_path, "lstm", kill, *scst, config=every_4_steps(tmp_path), in_process=True
    )
    assert_same_model(whole_run, broken_run)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_a_last_checkpoint_that_resumes(scenes, tmp_path, capsys):
    stop = [
        "--trainer.callbacks+=tests.plugins.SignalAt",
        "--trainer.callbacks.init_args.signal_name",
        "SIGTERM",
        "--trainer.callbacks.init_args.step",
        "5",
    ]
    args = tiny_args("fit", scenes, tmp_path / "work", tmp_path, "--trainer.max_epochs", "2")
    result = run([*args, *stop], tmp_path, expect=143)  # the signal is sent to a process of its own
    assert "Stopped on request" in result.stderr and "Traceback" not in result.stderr
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 5  # the step it stopped after
    main([*args, "--ckpt_path", "last"])  # resumed in this process (no start-up)
    assert "Resuming run" in capsys.readouterr().err
    assert torch.load(last, weights_only=True)["global_step"] > 5


def test_a_copied_checkpoint_starts_a_new_run_and_says_so(trained, scenes_source, tmp_path, capsys):
    checkpoint, work = trained
    copy = tmp_path / "elsewhere" / "copied.ckpt"
    copy.parent.mkdir()
    copy.write_bytes(Path(checkpoint).read_bytes())
    main(tiny_args("fit", scenes_source, work, tmp_path / "new", "--ckpt_path", str(copy), "--trainer.max_epochs", "5"))
    err = capsys.readouterr().err
    assert "not inside the run folder that wrote it" in err and "new run" in err
    assert list((tmp_path / "new").rglob("last.ckpt"))
