"""Where a run's files go, and the files a run writes for people and later runs."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from captioner.files import atomic_open


def run_dir(trainer: Trainer) -> Path:
    """The run's own folder, the parent of the one ModelCheckpoint uses by default.

    CSV and TensorBoard loggers: their `log_dir`. Other loggers (W&B):
    `save_dir/name/version`, as Lightning names checkpoint folders. No logger:
    the trainer's `default_root_dir`.
    """
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
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
