"""The training loader over a streamed feature set: LitData's `StreamingDataLoader`, with one item per caption (as the
cache's training set has), positioned from where training stands (`pip install 'captioner[shards]'`).

A streamed item is an image with all its captions. One epoch of captions is
`passes` passes over the images (the training set's captions per image,
rounded), each shuffled anew by LitData; in pass p an image gives its caption
`order[p % n]`, `order` a permutation of its n captions drawn from the run's
seed, the epoch and the image's name. So each caption is one item of an epoch,
an image's captions fall in different passes (never in one batch), and
`data.batch_size` counts captions, as it does for the cache: one config trains
the same kind of model from a folder or from shards. With whole-image items (an
objective that asks for them) there is one pass of images with all their captions.

LitData shuffles chunks, and items within a chunk: consecutive items come from
one chunk, and a chunk holds one input shard's images, which a crawl writes in
its own order. So items are read a *window* at a time (up to `window` batches,
fewer where a smaller window keeps more of a pass: `fitting_window`) and
shuffled within it (a permutation drawn from the seed, the epoch, the pass, the
rank and the window), then cut into batches: measured on the tests' shards, a
model trained without it from one loader process lost 8 BLEU-4 points to the
same model trained from the cache. The position within a window is exact on
resume (the window is read again and the batches trained on skipped).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset

from captioner.features.streamed import StreamedFeatures


def caption_order(seed: int, epoch: int, name: str, count: int) -> list[int]:
    """The order an image's captions are given out in during `epoch`: a permutation drawn from the seed, the epoch
    and the image's name alone (the same on every rank, worker and resumed run)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(count).tolist()


class CaptionPasses(StreamingDataset):
    """The `train/` stream as training items: one caption per image in each pass, or every caption with `per_image`.

    Args:
        location: The streamed set's `train/` folder or URL.
        tokenizer: Turns captions into tokens.
        passes: Passes over the images in one epoch of captions.
        seed: The run's seed (LitData's shuffle and the caption orders).
        per_image: Items are images with all their captions (one pass).
        options: For `StreamingDataset` (cache_dir, max_cache_size).
    """

    def __init__(
        self, location: str, tokenizer: Any, passes: int, seed: int, per_image: bool = False, **options: Any
    ) -> None:
        super().__init__(location, shuffle=True, drop_last=True, seed=seed, **options)
        self.tokenizer, self.passes, self.caption_seed, self.per_image = tokenizer, passes, seed, per_image

    def __getitem__(self, index: Any) -> dict[str, Any]:
        item = super().__getitem__(index)
        captions = item["captions"].split("\n")
        features = torch.from_numpy(np.asarray(item["features"]))
        if self.per_image:
            return {"features": features, "name": item["name"], "tokens": self.tokenizer.encode_batch(captions)}
        epoch, step = divmod(self.current_epoch - 1, self.passes)  # LitData counts its passes from 1
        chosen = captions[caption_order(self.caption_seed, epoch, item["name"], len(captions))[step % len(captions)]]
        return {"features": features, "name": item["name"], "tokens": self.tokenizer.encode_batch([chosen])[0]}


def collate(items: list[dict[str, Any]], pad_index: int, per_image: bool) -> dict[str, Any]:
    """Items as a batch like the cache's (`captioner.data.datasets`): `features`, `tokens`, `owners` (the row of each
    caption's image), and the images' `names`."""
    if per_image:
        tokens = torch.cat([item["tokens"] for item in items])
        owners = torch.cat([torch.full((len(item["tokens"]),), row) for row, item in enumerate(items)])
    else:
        tokens, owners = torch.stack([item["tokens"] for item in items]), torch.arange(len(items))
    used = int((tokens != pad_index).sum(dim=1).max()) if len(tokens) else 1
    return {
        "features": torch.stack([item["features"] for item in items]).float(),
        "tokens": tokens[:, :used],
        "owners": owners,
        "names": [item["name"] for item in items],
    }


def fitting_window(
    dataset: StreamingDataset, batch: int, window: int, num_workers: int, tolerance: float = 0.01
) -> int:
    """Batches per shuffled window: as many as `window` allows while a pass keeps (almost) every item.

    LitData hands each rank and worker whole windows and drops the items that do not fill one, so a window of `w`
    batches loses up to `w * batch - 1` items a pass: nothing on CC3M (8,191 of 3 million at 64 x 128), a tenth of
    the demo's 2,000 images at 7 x 128. The window chosen is the largest (up to `window`, and a worker's share of
    the pass) whose pass keeps all but `tolerance` of the items the best window would keep (on the demo: 5 batches,
    1,920 of 2,000 images a pass, the 15 whole batches of 128 there are).
    """
    workers = max(1, num_workers)
    items = len(dataset)  # this rank's items in a pass, one at a time
    largest = max(1, min(window, items // workers // batch))
    kept = {size: dataset.get_len(num_workers, size * batch) for size in range(1, largest + 1)}
    best = max(kept.values())
    return max(size for size, count in kept.items() if count >= best - tolerance * items)


class KeepItems:
    """Picklable collate for the loader's workers: a window's items as they are (batched after shuffling)."""

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return items


class StreamLoader(StreamingDataLoader):
    """LitData's loader over `passes` passes per epoch, reading windows of items it shuffles and cuts into batches of
    `batch` items, whose position comes from the datamodule's training position.

    Lightning fetches a batch ahead of the one it trains on, so a loader's own
    count runs one batch ahead of any checkpoint. The datamodule keeps the
    training position in its state instead (`captioner.data.sampling`);
    `state_at` turns it into the pass, the window and the batches done in it,
    which `start_at` restores before the resumed run's first batch. `state_dict`
    is empty, so Lightning neither saves the count that runs ahead nor restores it.

    Args:
        dataset: The `train/` stream (`CaptionPasses`).
        batch: Items per training batch.
        window: Batches per shuffled window.
        seed: The run's seed.
        rank: This process's rank (its windows are its own).
        pad_index, per_image: For the batches.
        options: For `StreamingDataLoader` (num_workers, pin_memory).
    """

    def __init__(
        self,
        dataset: CaptionPasses,
        batch: int,
        window: int,
        seed: int,
        rank: int,
        pad_index: int,
        per_image: bool,
        **options: Any,
    ) -> None:
        self.batch, self.seed, self.rank = batch, seed, rank
        self.pad_index, self.per_image, self.passes = pad_index, per_image, dataset.passes
        self.window = fitting_window(dataset, batch, window, options.get("num_workers") or 0)
        super().__init__(dataset, batch_size=self.window * batch, collate_fn=KeepItems(), drop_last=True, **options)
        self._start: tuple[int, int, int] | None = None  # pass, window, batches done in it

    def pass_batches(self) -> int:
        """Batches one pass gives this rank."""
        return super().__len__() * self.window

    def __len__(self) -> int:
        return self.pass_batches() * self.passes

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to do: the datamodule positioned the loader already."""

    def _order(self, litdata_epoch: int, window: int, size: int) -> list[int]:
        digest = hashlib.sha256(f"{self.seed}:{litdata_epoch}:{self.rank}:{window}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(size).tolist()

    def __iter__(self) -> Any:
        first, window, skip = self._start if self._start is not None else (0, 0, 0)
        self._start = None
        if window:
            super().load_state_dict(self._litdata_state(self.current_epoch + 1, window))
        windows = super().__len__()
        for _ in range(first, self.passes):
            done = window
            for items in super().__iter__():
                order = self._order(self.current_epoch, done, len(items))
                done += 1
                if done >= windows:
                    # LitData replays a restored state until an iterator of it runs to its end, which Lightning's
                    # stopping after the epoch's last batch never lets happen: say so at the pass's known end.
                    self.restore = False
                for start in range(skip * self.batch, len(items), self.batch):
                    yield collate([items[i] for i in order[start : start + self.batch]], self.pad_index, self.per_image)
                skip = 0
            window = 0

    def _litdata_state(self, litdata_epoch: int, windows: int) -> dict[str, Any]:
        """LitData's state after `windows` windows of this rank in the pass that is its epoch `litdata_epoch`."""
        items = windows * self.batch_size
        state = super().state_dict()
        workers = self.num_workers or 1
        state.update(current_epoch=litdata_epoch, num_samples_yielded=items, latest_worker_idx=(windows - 1) % workers)
        state["dataset"] = self.dataset.state_dict(items, self.num_workers, self.batch_size)
        state["dataset"]["current_epoch"] = litdata_epoch
        return state

    def state_at(self, epoch: int, items: int) -> dict[str, Any]:
        """Where `items` items (this rank's) into `epoch` (Lightning's count, from 0) stand: the pass, the window in
        it and the batches done in that window."""
        step, within = divmod(items // self.batch, self.pass_batches())
        window, batches = divmod(within, self.window)
        return {"pass": step, "window": window, "batches": batches}

    def start_at(self, epoch: int, state: dict[str, Any] | None) -> None:
        """Start at `epoch` (Lightning's count), at the pass, window and batch `state_at` gave (None: the epoch's
        start)."""
        state = state or {"pass": 0, "window": 0, "batches": 0}
        self.current_epoch = epoch * self.passes + state["pass"]  # LitData adds one as a pass starts
        self._start = (state["pass"], state["window"], state["batches"])


def train_loader(
    features: StreamedFeatures,
    tokenizer: Any,
    batch_size: int,
    num_workers: int,
    seed: int,
    pin_memory: bool,
    per_image: bool = False,
    cache_dir: str | None = None,
    max_cache_gb: float | None = None,
    rank: int = 0,
    window: int = 64,
) -> StreamLoader:
    """The training loader over the set's `train/` stream: each rank its share of the chunks (equal shares: the few
    items left over wait for another epoch), one caption per item (see the module docstring), or whole images with
    `per_image`, shuffled in windows of `window` batches."""
    passes = 1 if per_image else max(1, round(features.captions_per_image))
    dataset = CaptionPasses(
        features.split("train"),
        tokenizer,
        passes,
        seed,
        per_image,
        cache_dir=cache_dir,
        max_cache_size=f"{max_cache_gb}GB" if max_cache_gb else None,
    )
    return StreamLoader(
        dataset,
        batch_size,
        window,
        seed,
        rank,
        tokenizer.pad_index,
        per_image,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
