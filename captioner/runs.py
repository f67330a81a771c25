"""Where a run's files go, and the files a run writes for people and later runs."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from captioner.core.files import atomic_open


def run_dir(trainer: Trainer) -> Path:
    """The run's own folder, the parent of the one ModelCheckpoint uses by default.

    CSV and TensorBoard loggers: their `log_dir`. Other loggers (W&B):
    `save_dir/name/version`, as Lightning names checkpoint folders. No logger:
    `default_root_dir/run` (never the working folder itself, which a run's
    config.yaml, samples and reports would litter; Lightning keeps the
    checkpoints of such a run in `default_root_dir/checkpoints`).
    """
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir) / "run"
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return Path(logger.log_dir)
    save_dir = logger.save_dir or trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(save_dir) / str(logger.name) / version


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


RUN_KEY = "captioner_run"  # what a checkpoint records of the run that wrote it
RESUMES_FILE = "resumes.jsonl"


def checkpoint_run(path: str | Path) -> dict | None:
    """The run a checkpoint was written by (`{"folder", "version"}`), or None for checkpoints that do not say.

    Reads only that entry's pages of the file (memory-mapped), not the weights.
    """
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable file is reported where it is loaded, with the reason
        return None
    run = checkpoint.get(RUN_KEY)
    return run if isinstance(run, dict) and {"folder", "version"} <= set(run) else None


def run_to_continue(ckpt_path: str | Path) -> dict | None:
    """The run that `fit --ckpt_path` continues: the checkpoint's own run, when the file is still in its folder.

    A checkpoint copied elsewhere (or written before runs were recorded) starts a new run.

    Returns:
        `{"folder", "version"}` of the run to continue, or None for a new run.
    """
    run = checkpoint_run(ckpt_path)
    if run is None:
        return None
    folder = Path(run["folder"]).resolve()
    if folder not in Path(ckpt_path).resolve().parents:
        return None
    return run


def append_jsonl(path: str | Path, row: dict) -> None:
    """Add one JSON line to a file, atomically (the file is rewritten whole)."""
    path = Path(path)
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    with atomic_open(path, "w") as handle:
        handle.write(existing + json.dumps(row, ensure_ascii=False) + "\n")
