"""LastCheckpoint: `last.ckpt`, always the newest state of the run, whatever the monitored score does."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Rewrite `last.ckpt` after every validation (and, with `every_n_train_steps`, every N optimizer steps).

    Since Lightning 2.6, `ModelCheckpoint(save_last=True)` writes `last.ckpt`
    only when a top-k checkpoint is saved in the same step, so after an epoch
    that does not improve the monitored score, `last.ckpt` is an older state
    and `--ckpt_path last` would silently go back in time. This callback keeps
    `last.ckpt` current on its own; the monitoring `ModelCheckpoint` keeps the
    best ones. Both write into the same checkpoints folder.

    Args:
        every_n_train_steps: Also save every N optimizer steps (for long epochs; None: at validation only).
        dirpath: Folder (default: the run's checkpoints folder, as ModelCheckpoint's).
    """

    def __init__(self, every_n_train_steps: int | None = None, dirpath: str | None = None, **kwargs: Any) -> None:
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         save_last=False, every_n_train_steps=every_n_train_steps, enable_version_counter=False,
                         **kwargs)  # fmt: skip

    @property
    def state_key(self) -> str:
        return self._generate_state_key(role="last")  # its own entry in a checkpoint's callback states

    def path(self, trainer: Trainer) -> str:
        """Where `last.ckpt` is (or will be)."""
        return self.best_model_path or self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
