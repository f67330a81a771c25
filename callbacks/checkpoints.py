"""Checkpoints that make an interruption invisible: `last.ckpt` kept current, the run and its random state recorded.

- `LastCheckpoint` rewrites `last.ckpt` at every validation (and every N
  training steps on request), and when training stops on an exception, on
  SIGTERM (what SLURM and other schedulers send before a kill) or on Ctrl-C.
- `ResumableRun` records in every checkpoint which run wrote it, seeds every
  random generator a training step draws from (torch on every device, NumPy,
  Python) at the start of each step from the run's seed, the epoch, the batch and
  the rank, notes each resume in the run folder's `resumes.jsonl` and in the W&B
  run, and turns a first Ctrl-C into Lightning's graceful stop after the current
  batch.

What a training step depends on, and where it is kept, so that a resumed run
trains the model the uninterrupted one would have, bit for bit, whether it
stopped at an epoch boundary or mid-epoch:

- its random numbers: a function of (seed, epoch, batch, rank), set here before
  every step, so nothing that draws between steps (a callback, a loader, a
  sanity check, a validation) can shift them, and there is no generator state
  to save;
- its batch: the order is a function of (seed, epoch), and the position in it
  is the datamodule's state in the checkpoint (`captioner.data.sampling`);
  augmented images are a function of (seed, epoch, image);
- the weights, the optimizer, the learning-rate schedule and the loops'
  counters: Lightning's own checkpoint.

`python -m captioner` adds `ResumableRun` to every run; the configs list `LastCheckpoint`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import time
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from captioner.runs import RESUMES_FILE, RUN_KEY, append_jsonl, run_dir

log = logging.getLogger("captioner")


class LastCheckpoint(ModelCheckpoint):
    """Rewrite `last.ckpt` after every validation, every `every_n_train_steps` steps, and when training stops early.

    Since Lightning 2.6, `ModelCheckpoint(save_last=True)` writes `last.ckpt`
    only when a top-k checkpoint is saved in the same step, so after an epoch
    that does not improve the monitored score, `last.ckpt` is an older state
    and `--ckpt_path last` would silently go back in time. This callback keeps
    `last.ckpt` current on its own; the monitoring `ModelCheckpoint` keeps the
    best ones. Both write into the same checkpoints folder. On an exception,
    SIGTERM or Ctrl-C it saves the state after the last finished step.

    Args:
        every_n_train_steps: Also save every N optimizer steps (long epochs: a resume repeats at most N steps;
            None: at validation only).
        dirpath: Folder (default: the run's checkpoints folder, as ModelCheckpoint's).
    """

    def __init__(self, every_n_train_steps: int | None = None, dirpath: str | None = None, **kwargs: Any) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=self.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,
            save_last=False,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
            save_on_exception=True,
            **kwargs,
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(role="last")  # its own entry in a checkpoint's callback states

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # ModelCheckpoint saves either every N steps or at epoch ends, never both; last.ckpt needs both, or it would
        # lag behind the finished epoch (and its validation) by up to N - 1 steps.
        if self._every_n_train_steps and not self._should_skip_saving_checkpoint(trainer):
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The seed of one training step: distinct for every step and rank, the same in every run with `seed`."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{batch}/{rank}".encode()).digest()[:8], "little") >> 1


def seed_step(seed: int) -> None:
    """Seed every generator a training step may draw from: torch (CPU and every GPU), NumPy, Python."""
    torch.manual_seed(seed)  # every device's generator too
    np.random.seed(seed % 2**32)
    random.seed(seed)


class ResumableRun(Callback):
    """Make a resumed run the same run (see the module docstring)."""

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None
        self._previous_sigint: Any = None

    # ------------------------------------------------------------ what a checkpoint records
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        version = trainer.logger.version if trainer.logger is not None else None
        checkpoint[RUN_KEY] = {"folder": str(run_dir(trainer).resolve()), "version": version}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restored = checkpoint.get(RUN_KEY)

    # ------------------------------------------------------------ every step's random numbers
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        seed_step(
            step_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), trainer.current_epoch, batch_idx, trainer.global_rank)
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored is None or trainer.ckpt_path is None:
            return
        if trainer.is_global_zero:
            row = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "checkpoint": str(trainer.ckpt_path),
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "same_run": str(run_dir(trainer).resolve()) == self._restored.get("folder"),
            }
            append_jsonl(run_dir(trainer) / RESUMES_FILE, row)
            for logger in trainer.loggers:
                logger.log_hyperparams({"resumed_from": row})
        self._restored = None

    # ------------------------------------------------------------ Ctrl-C stops after the current batch
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return  # someone else handles Ctrl-C (a notebook, a launcher): leave it to them

        def stop_after_this_batch(signum, frame) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
            print("\nCtrl-C: stopping after this batch and saving last.ckpt (Ctrl-C again to stop now).", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's graceful stop, which LastCheckpoint saves on

        self._previous_sigint = signal.signal(signal.SIGINT, stop_after_this_batch)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
