"""The training order, and where in it a run stands: what makes a resumed epoch see the batches the uninterrupted one
would have seen, from its first batch or from the middle.

The order is a function of the seed and the epoch alone (as `DistributedSampler`
draws it, each rank its share). Where a run stands, `TrainingPosition`, is part
of the datamodule's state, which Lightning writes into every checkpoint and
hands back before any loader of the resumed run exists; the resumed run's first
training loader then starts at that epoch and skips the items already trained
on. (It cannot be left to `set_epoch`: Lightning builds and starts the first
loader, whose workers draw indices at once, before it restores the epoch.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


@dataclass(frozen=True)
class TrainingPosition:
    """Where training stands: the epoch the next batch belongs to, and how many of its items (per rank) are done."""

    epoch: int
    items: int = 0

    @classmethod
    def of_trainer(cls, trainer: Any, batch_size: int) -> TrainingPosition:
        """From the trainer's progress counters (the loader cannot count: Lightning fetches a batch ahead)."""
        fit_loop, epoch = trainer.fit_loop, trainer.current_epoch  # the epoch in progress (not yet completed)
        batches = fit_loop.epoch_loop.batch_progress.current.processed  # its batches trained on, the current one too
        # Saved at the epoch's end (its last batch, validation, on_train_epoch_end): the next epoch starts afresh.
        if fit_loop.epoch_progress.current.processed > epoch or batches >= trainer.num_training_batches:
            return cls(epoch + 1, 0)
        return cls(epoch, batches * batch_size)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ResumableSampler(DistributedSampler):
    """A shuffling `DistributedSampler` that can start at a given position.

    Args:
        dataset: The training set.
        num_replicas, rank, seed: As `DistributedSampler`.
        start: Begin at this epoch, after its first `items` indices (a resumed run); None: epoch 0 from the start.
        tag_epoch: Yield `(epoch, index)` instead of `index`, for datasets whose items depend on the epoch
            (random crops of a fine-tuned encoder).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        seed: int,
        start: TrainingPosition | None = None,
        tag_epoch: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.tag_epoch, self._start = tag_epoch, start
        if start is not None:
            self.epoch = start.epoch

    def __iter__(self) -> Iterator[Any]:
        indices = list(super().__iter__())
        if self._start is not None and self._start.epoch == self.epoch:
            indices = indices[self._start.items :]
        self._start = None  # once: later epochs start from their beginning
        epoch = self.epoch
        return iter([(epoch, index) for index in indices] if self.tag_epoch else indices)


class ResumableLoader(DataLoader):
    """The training `DataLoader`. Its position is kept in the datamodule's state (restored before any loader
    exists); the empty `state_dict` here tells Lightning that the loader resumes mid-epoch, which it checks for."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to do: `CaptionDataModule.load_state_dict` placed the sampler already."""
