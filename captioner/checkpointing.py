"""Checkpoints written like every other file a later run trusts: temporary name, then rename."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from captioner.files import atomic_open


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save checkpoints to a temporary file in the target folder and rename it into place.

    Lightning's own save goes through an fsspec transaction whose temporary
    file lives in the system temp folder; when that is another file system
    the final step is a copy, which a full disk can cut short. Renaming
    within one folder is atomic: a checkpoint is complete or absent.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        with atomic_open(path, "wb") as handle:
            torch.save(checkpoint, handle)
