"""Shared fixtures: tiny generated datasets and an offline environment."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from captioner.data.synthetic import write_synthetic_dataset

TESTS = Path(__file__).parent
TINY_CONFIG = TESTS / "conf" / "tiny.yaml"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker gets its share of the cores, for itself and the processes it starts.

    Without it every worker's torch (and every run a test starts) takes all the cores: on two cores two workers
    run four compute threads, and OpenMP's waiting threads spin against each other, slower than one worker alone.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[variable] = threads
        torch.set_num_threads(int(threads))


# The files that take longest, started first: pytest-xdist hands each worker a whole file (--dist loadfile) in the
# order collected (with --no-loadscope-reorder: by default xdist 3.8 orders files by their number of tests instead),
# so a long file collected last leaves the other worker idle at the end (longest first: the tail is the shortest
# file). Every file over about 10 s is listed, by its measured sum on 2 cores (seconds, one heavily loaded run: the
# order is what counts): docs 116, resume 95, shards 74, serve 61, bulk 50, distributed 40, evaluation 37, cli 33,
# export 32, records pass 23, gpu check 23, encoders 18, faults 17, packaging 15, prefix LM 14, tracking 12, styles 11,
# plugins 10, features 10, metrics 9.
LONGEST_FIRST = [
    "test_docs.py",
    "test_resume.py",
    "test_shards.py",
    "test_serve.py",
    "test_bulk.py",
    "test_distributed.py",
    "test_evaluation.py",
    "test_cli.py",
    "test_export.py",
    "test_records_pass.py",
    "test_gpu_check.py",
    "test_encoders.py",
    "test_faults.py",
    "test_packaging.py",
    "test_prefix_lm.py",
    "test_tracking.py",
    "test_styles.py",
    "test_plugins.py",
    "test_features.py",
    "test_metrics.py",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the longest files first (the same order in every worker, as xdist requires)."""
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the files' own order kept otherwise


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No test may reach the network: W&B off, caches in temporary folders."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    # The PTB tokenizer and METEOR left out of every evaluation (METEOR's Java start is 5 s of each `test`); the tests
    # of the COCO scores themselves turn them back on.
    monkeypatch.setenv("CAPTIONER_JAVA", "0")
    cache = tmp_path_factory.getbasetemp() / "offline-cache"
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache / "kagglehub"))
    monkeypatch.setenv("HF_HOME", str(cache / "huggingface"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "huggingface" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for subprocesses; the hub client reads it when first imported:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # so this process is offline too
    from captioner.core import parts

    monkeypatch.setattr(parts, "_allowed", set())  # modules a test's run allowed do not leak into the next test
    monkeypatch.delenv(parts.ALLOW_VARIABLE, raising=False)


@pytest.fixture(scope="session")
def scenes_source(tmp_path_factory) -> Path:
    """120 generated scenes in the Mini-COCO layout (made once per session)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("source") / "scenes", num_images=120, seed=1)


@pytest.fixture
def scenes(scenes_source, tmp_path) -> Path:
    """A private copy of the scenes that a test may modify."""
    return Path(shutil.copytree(scenes_source, tmp_path / "scenes"))


def copy_scenes(scenes: Path, folder: Path, count: int) -> Path:
    """The first `count` scene pictures copied into a new `folder` (photos to caption, measure or calibrate on)."""
    folder.mkdir()
    for path in sorted((scenes / "Images").iterdir())[:count]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def tiny_args(subcommand: str, data_dir: Path, work_dir: Path, root: Path, *extra: str) -> list[str]:
    """Arguments for `main` on the tiny config with every output under temporary folders."""
    return [
        subcommand,
        "--config",
        str(TINY_CONFIG),
        "--data.data_dir",
        str(data_dir),
        "--data.work_dir",
        str(work_dir),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root / "runs"),
        *extra,
    ]


def predict_args(checkpoint: Path, photos: Path, save_dir: Path, *extra: str) -> list[str]:
    """Arguments for `main` to predict on `photos` with the tiny config (the predictions writer is always there)."""
    return [
        "predict",
        "--config",
        str(TINY_CONFIG),
        "--ckpt_path",
        str(checkpoint),
        "--data.predict_dir",
        str(photos),
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        *extra,
    ]


def wandb_logger_args(save_dir: Path) -> list[str]:
    """Replace the tiny config's logger with W&B (its mode comes from the environment)."""
    return [
        "--trainer.logger",
        "lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.save_dir",
        str(save_dir),
        "--trainer.logger.project",
        "captioner-test",
    ]


@pytest.fixture(scope="session")
def trained(scenes_source, tmp_path_factory):
    """A tiny model trained for a few epochs: (checkpoint path, work dir)."""
    from captioner.cli import main

    root = tmp_path_factory.mktemp("trained")
    cli = main(tiny_args("fit", scenes_source, root / "work", root, "--trainer.max_epochs", "4"))
    return Path(cli.trainer.checkpoint_callback.best_model_path), root / "work"


def last_checkpoint(trainer) -> str:
    """The run's `last.ckpt` (written by captioner.callbacks.LastCheckpoint)."""
    from captioner.callbacks import LastCheckpoint

    (callback,) = [c for c in trainer.callbacks if isinstance(c, LastCheckpoint)]
    return callback.best_model_path


def write_gpt2_like_tokenizer(path: Path, captions: list[str]) -> None:
    """A byte-level BPE with GPT-2's end-of-text token and no padding, saved as a pretrained one would be."""
    import tokenizers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False, initial_alphabet=alphabet
    )
    tokenizer.train_from_iterator(captions, trainer)
    tokenizer.save(str(path))


CHROMEDRIVER = Path("/usr/bin/chromedriver")


def chromium() -> str | None:
    """Debian's Chromium, where it and its chromedriver are installed (`.ci/run` installs them), else None."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found if found and CHROMEDRIVER.exists() else None


def headless_chromium(profile: Path):
    """A headless Chromium driven through Debian's chromedriver (Selenium Manager never runs: no network)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
