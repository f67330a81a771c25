"""The training loader over a streamed feature set: LitData's `StreamingDataLoader`, positioned from where training
stands (`pip install 'captioner[shards]'`; imported only when training streams)."""

from __future__ import annotations

from typing import Any

from litdata import StreamingDataLoader, StreamingDataset

from captioner.data.streamed import StreamedFeatures, TokenizedImage, collate_images_with_captions


class _Collate:
    """Picklable collate for the loader's workers."""

    def __init__(self, pad_index: int) -> None:
        self.pad_index = pad_index

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_images_with_captions(items, self.pad_index)


class StreamLoader(StreamingDataLoader):
    """LitData's loader, whose position comes from the datamodule's training position.

    Lightning fetches a batch ahead of the one it trains on, so the loader's own
    count runs one batch ahead of any checkpoint. The datamodule keeps the
    training position in its state instead (`captioner.data.sampling`) and
    `state_at` turns it into LitData's state, which `start_at` restores in the
    resumed run's loader before its first batch. `state_dict` is empty, so
    Lightning neither saves the count that runs ahead nor restores it.
    """

    _restored_batches = 0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def __iter__(self) -> Any:
        # LitData replays a restored state until an iterator of it runs to its end; Lightning stops asking after an
        # epoch's last batch, so the epoch after a resumed one would replay it. Its end is known: say so there.
        done = self._restored_batches if self.restore else 0
        self._restored_batches, total = 0, len(self)
        for batch in super().__iter__():
            done += 1
            if done >= total:
                self.restore = False
            yield batch

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to do: the datamodule positioned the loader already."""

    def state_at(self, epoch: int, items: int) -> dict[str, Any] | None:
        """LitData's state after `items` items (this rank's) of `epoch` (Lightning's count, from 0); None at an
        epoch's start."""
        if items == 0:
            return None
        state = super().state_dict()
        workers = self.num_workers or 1
        state.update(current_epoch=epoch + 1, num_samples_yielded=items,
                     latest_worker_idx=(items // self.batch_size - 1) % workers)  # fmt: skip
        state["dataset"] = self.dataset.state_dict(items, self.num_workers, self.batch_size)
        state["dataset"]["current_epoch"] = epoch + 1
        return state

    def start_at(self, epoch: int, state: dict[str, Any] | None) -> None:
        """Start at `epoch` (Lightning's count), from LitData's `state` when the checkpoint was taken mid-epoch."""
        if state is not None:
            super().load_state_dict(state)
            self._restored_batches = state["num_samples_yielded"] // self.batch_size
        else:
            self.current_epoch = epoch  # LitData counts epochs from 1, adding one as an epoch starts


def train_loader(features: StreamedFeatures, tokenizer: Any, batch_size: int, num_workers: int, seed: int,
                 pin_memory: bool, cache_dir: str | None = None,
                 max_cache_gb: float | None = None) -> StreamLoader:  # fmt: skip
    """The training loader over the set's `train/` stream: shuffled by LitData from `seed` and the epoch, each
    rank its share of the chunks (equal shares: the few items left over wait for another epoch), images with all
    their captions."""
    dataset = StreamingDataset(
        features.split("train"), cache_dir=cache_dir, shuffle=True, drop_last=True, seed=seed,
        transform=TokenizedImage(tokenizer), max_cache_size=f"{max_cache_gb}GB" if max_cache_gb else None,
    )  # fmt: skip
    return StreamLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                        collate_fn=_Collate(tokenizer.pad_index), drop_last=True)  # fmt: skip
