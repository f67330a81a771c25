"""A feature cache held whole in memory, on the training device (or in pinned host memory beside a GPU), where
batches are gathered by row after their transfer: no loader worker copies features, batch after batch."""

from __future__ import annotations

import os

import numpy as np
import torch


class ResidentFeatures:
    """A complete cache held whole in memory, on the training device or in pinned host memory, where batches are
    gathered by row: no loader worker copies features, batch after batch.

    Args:
        features: The cache's `(N, ...)` float16 array (read once).
        device: Where the rows are gathered (the training device).
        host: Keep the table in (pinned, on a GPU machine) host memory and copy each gathered batch to `device`,
            for a table over the device's budget.
    """

    def __init__(self, features: np.ndarray, device: torch.device | str, host: bool = False) -> None:
        self.device = torch.device(device)
        table = torch.from_numpy(np.array(features, dtype=np.float16, copy=True))  # read whole, into memory
        if host:
            self.table = table.pin_memory() if self.device.type == "cuda" else table
        else:
            self.table = table.to(self.device)

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows' features as float32 on the training device."""
        picked = self.table[rows.to(self.table.device)]
        return picked.to(self.device, non_blocking=True).float()


def memory_budget(device: torch.device | str) -> int:
    """Bytes a resident feature table may take by default: half of the device's free memory on a GPU, a quarter of
    the memory the host has available otherwise (what is left for the model, its activations and the loaders)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: be modest
        available = 4 * 2**30
    return available // 4


def host_budget() -> int:
    """A quarter of the host's available memory (for a table kept in pinned host memory beside a GPU)."""
    return memory_budget("cpu")
