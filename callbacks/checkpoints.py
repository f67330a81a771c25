"""Checkpoints that make an interruption invisible: `last.ckpt` kept current, the run and its random state recorded.

- `LastCheckpoint` rewrites `last.ckpt` at every validation (and every N
  training steps on request), and when training stops on an exception, on
  SIGTERM (what SLURM and other schedulers send before a kill) or on Ctrl-C.
- `ResumableRun` records in every checkpoint which run wrote it and the state
  of the random number generators, restores that state when a run resumes (so
  the resumed run draws the same dropout masks the uninterrupted one would),
  notes each resume in the run folder's `resumes.jsonl` and in the W&B run, and
  turns a first Ctrl-C into Lightning's graceful stop after the current batch.

`python -m captioner` adds `ResumableRun` to every run; the configs list `LastCheckpoint`.
"""

from __future__ import annotations

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
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         save_last=False, every_n_train_steps=every_n_train_steps, enable_version_counter=False,
                         save_on_exception=True, **kwargs)  # fmt: skip

    @property
    def state_key(self) -> str:
        return self._generate_state_key(role="last")  # its own entry in a checkpoint's callback states


def random_state() -> dict[str, Any]:
    """Every generator training draws from: torch (CPU and CUDA), NumPy, Python (as tensors and plain data, which
    checkpoints loaded with `weights_only=True` accept)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableRun(Callback):
    """Make a resumed run the same run (see the module docstring)."""

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None
        self._previous_sigint: Any = None

    # ------------------------------------------------------------ what a checkpoint records
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        version = trainer.logger.version if trainer.logger is not None else None
        checkpoint[RUN_KEY] = {"folder": str(run_dir(trainer).resolve()), "version": version,
                               "random_state": random_state()}  # fmt: skip

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restored = checkpoint.get(RUN_KEY)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After the sanity check (whose data loaders draw from the generators), before the first resumed batch:
        # where the uninterrupted run stood when it saved the checkpoint.
        if self._restored is None or trainer.ckpt_path is None:
            return
        if "random_state" in self._restored:
            set_random_state(self._restored["random_state"])
        if trainer.is_global_zero:
            row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(trainer.ckpt_path),
                   "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                   "same_run": str(run_dir(trainer).resolve()) == self._restored.get("folder")}  # fmt: skip
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
