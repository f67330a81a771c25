"""Records of caption sets too large to hold in one process (web-scale WebDataset shards): one index file per input
shard, splits decided by a hash of each image's name, and iterators that read one shard's index at a time.

The records pass reads every shard once (captions and keys; image bytes are
skipped), writes `<prepared>/shards/<n>.jsonl` (one `[name, [captions]]` line per
kept image, in the shard's order) and `sharded.json` (the shard list, counts and
the split thresholds). Memory stays bounded whatever the number of images: one
shard's records, the val/test candidates (a heap of `val_size + test_size`
hashes), and 8 bytes per image to tell keys met twice across shards.

Splits: an image's split is a function of its key and the split seed alone
(`captioner.data.splits.key_hash` of `image_key`: the member's key, not the
shard's name), so it is the same whichever process, rank or shard order reads
it, and the same as the image's in a folder of the same images. Counts
(`val_size: 5000`) take the images with the smallest hashes (exactly that many,
as a folder's split does); fractions (`0.01`) take those whose hash falls under
that share of the range.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.core.errors import CaptionerError
from captioner.core.files import atomic_open, read_json, require_keys, write_json
from captioner.data.splits import SPLITS, image_key, key_hash
from captioner.sources.records import CaptionRecord, DataReport
from captioner.sources.shards import shard_of

HASH_RANGE = 2**64
SHARDED_VERSION = 2  # 2: splits hash the member's key, not the shard's name
SHARDED_FILE = "sharded.json"


class _KeysSeen:
    """Which keys were met already, in 8 bytes each (a sorted array of their hashes, merged shard by shard)."""

    def __init__(self) -> None:
        self.seen = np.zeros(0, dtype=np.uint64)

    def new(self, names: list[str]) -> list[bool]:
        """Whether each image's key (its name inside its shard) is new, and remember them."""
        hashes = np.array([key_hash(shard_of(name)[1], -1) for name in names], dtype=np.uint64)
        fresh = ~np.isin(hashes, self.seen)
        _, first = np.unique(hashes, return_index=True)
        once = np.zeros(len(names), dtype=bool)
        once[first] = True
        self.seen = np.union1d(self.seen, hashes[fresh])
        return (fresh & once).tolist()


@dataclass
class SplitRule:
    """How an image's hash decides its split: at or under `test` test, at or under `val` validation, else training."""

    test: int
    val: int

    def split_of(self, name: str, seed: int) -> str:
        """The split of the image `name` (a record's file name)."""
        value = key_hash(image_key(name), seed)
        return "test" if value <= self.test else "val" if value <= self.val else "train"


class _Smallest:
    """The `size` smallest hashes seen (a bounded heap)."""

    def __init__(self, size: int) -> None:
        self.size, self.heap = size, []  # max-heap through negated values

    def add(self, value: int) -> None:
        if self.size <= 0:
            return
        if len(self.heap) < self.size:
            heapq.heappush(self.heap, -value)
        elif value < -self.heap[0]:
            heapq.heapreplace(self.heap, -value)

    def sorted(self) -> list[int]:
        return sorted(-value for value in self.heap)


def _is_fraction(size: int | float) -> bool:
    return isinstance(size, float) and not size.is_integer()


class SplitDraw:
    """Draws the split thresholds in one pass over the images' hashes, keeping only the few hashes exact counts need.

    A fraction is a share of the hash range (known before the pass); a count takes the images with the smallest
    hashes (test first, then validation among those above the test threshold).

    Raises:
        CaptionerError: When a size is neither a count nor a fraction in (0, 1).
    """

    def __init__(self, val_size: int | float, test_size: int | float) -> None:
        for size, name in ((val_size, "val"), (test_size, "test")):
            if size < 0 or (_is_fraction(size) and not 0 < size < 1):
                raise CaptionerError(f"--data.splits.{name}_size {size} must be a count or a fraction between 0 and 1.")
        self.val_size, self.test_size = val_size, test_size
        # Below this hash an image is test whatever else is seen (a fraction); None: the smallest decide.
        self.test_bound = int(test_size * HASH_RANGE) - 1 if _is_fraction(test_size) else None
        needed = (0 if _is_fraction(test_size) else int(test_size)) + (0 if _is_fraction(val_size) else int(val_size))
        self.smallest = _Smallest(needed)

    def add(self, value: int) -> None:
        if self.test_bound is None or value > self.test_bound:
            self.smallest.add(value)

    def rule(self, count: int) -> SplitRule:
        """The thresholds once every hash was added (`count` images).

        Raises:
            CaptionerError: When the sizes leave no training image.
        """
        ranked = self.smallest.sorted()
        n_test = round(self.test_size * count) if _is_fraction(self.test_size) else int(self.test_size)
        n_val = round(self.val_size * count) if _is_fraction(self.val_size) else int(self.val_size)
        if n_val + n_test >= count:
            raise CaptionerError(
                f"Split sizes val={n_val} and test={n_test} leave no training image out of {count}: "
                "lower --data.splits.val_size / test_size."
            )
        if self.test_bound is not None:
            test, above = self.test_bound, ranked
        else:
            test, above = (ranked[n_test - 1] if n_test else -1), ranked[n_test:]
        if _is_fraction(self.val_size):
            return SplitRule(test, test + int(self.val_size * HASH_RANGE))
        return SplitRule(test, above[n_val - 1] if n_val else test)


@dataclass
class ShardedRecords:
    """A caption set kept as one index file per input shard (see the module docstring).

    Attributes:
        folder: The folder of the index files.
        shards: The shards' locations, in order (index file `n.jsonl` is shard n).
        counts: Images and captions kept, per split.
        rule: How an image's hash decides its split.
        seed: The split seed.
    """

    folder: Path
    shards: list[str]
    counts: dict[str, dict[str, int]]
    rule: SplitRule
    seed: int

    def index_file(self, shard: int) -> Path:
        return self.folder / f"{shard:06d}.jsonl"

    def split_of(self, name: str) -> str:
        return self.rule.split_of(name, self.seed)

    def shard_records(self, shard: int) -> list[CaptionRecord]:
        """One shard's records (with their split), in the shard's order.

        Raises:
            CaptionerError: When its index file is missing or malformed.
        """
        path = self.index_file(shard)
        try:
            with path.open(encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle]
            return [
                CaptionRecord(str(name), tuple(map(str, captions)), None, self.split_of(name), _styles(styles))
                for name, captions, *styles in rows
            ]
        except (OSError, ValueError, TypeError) as error:
            raise CaptionerError(
                f"The shard index {path} is missing or malformed ({error}); delete "
                f"{self.folder.parent} to prepare the data again."
            ) from error

    def records(self, split: str | None = None) -> Iterator[CaptionRecord]:
        """Every record (of one split), a shard at a time."""
        for shard in range(len(self.shards)):
            yield from (record for record in self.shard_records(shard) if split is None or record.split == split)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SHARDED_VERSION,
            "shards": self.shards,
            "counts": self.counts,
            "seed": self.seed,
            "rule": {"test": str(self.rule.test), "val": str(self.rule.val)},
        }

    @classmethod
    def read(cls, path: Path) -> ShardedRecords:
        """The `sharded.json` of a preparation, checked.

        Raises:
            CaptionerError: When it is missing, malformed or of another version.
        """
        payload = read_json(path, "Sharded records")
        require_keys(payload, ("version", "shards", "counts", "seed", "rule"), path, "Sharded records")
        if payload["version"] != SHARDED_VERSION:
            raise CaptionerError(
                f"{path} has version {payload['version']}, expected {SHARDED_VERSION} (version 1 "
                f"split by the shard's name too): delete {path.parent} to prepare the data again."
            )
        rule = SplitRule(int(payload["rule"]["test"]), int(payload["rule"]["val"]))
        return cls(path.parent / "shards", list(payload["shards"]), payload["counts"], rule, int(payload["seed"]))


def index_shards(
    shards: Iterable[tuple[str, list[CaptionRecord]]],
    folder: Path,
    val_size: int | float,
    test_size: int | float,
    seed: int,
    report: DataReport,
) -> ShardedRecords:
    """The records pass over shards (each given as its location and records): index files written a shard at a time,
    keys met twice across shards skipped and counted, the split thresholds drawn.

    Args:
        shards: `(location, records)` per shard, in order (`captioner.data.formats.WebDataset.shard_records`).
        folder: The prepared data's folder (index files go to `folder/shards/`, the summary to `sharded.json`).
        val_size, test_size, seed: The split settings.
        report: Counts what is skipped.

    Raises:
        CaptionerError: When no usable image is left, or the sizes leave no training image.
    """
    index_dir = folder / "shards"
    index_dir.mkdir(parents=True, exist_ok=True)
    seen, draw, locations, images = _KeysSeen(), SplitDraw(val_size, test_size), [], 0
    for number, (location, records) in enumerate(shards):
        locations.append(location)
        with atomic_open(index_dir / f"{number:06d}.jsonl", "w") as handle:
            for record, new in zip(records, seen.new([record.file_name for record in records])):
                if not new:
                    report.count("duplicate keys", record.file_name)
                    continue
                draw.add(key_hash(image_key(record.file_name), seed))
                line = [record.file_name, list(record.captions)] + ([list(record.styles)] if record.styles else [])
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                images += 1
    if not images:
        raise CaptionerError(f"No usable image in the shards: {report.summary()}.")
    sharded = ShardedRecords(index_dir, locations, {}, draw.rule(images), seed)
    counts = {split: {"images": 0, "captions": 0} for split in SPLITS}
    for record in sharded.records():
        counts[record.split]["images"] += 1
        counts[record.split]["captions"] += len(record.captions)
    sharded.counts = counts
    write_json(folder / SHARDED_FILE, sharded.to_dict())
    return sharded


def shards_fingerprint(source: Path, caption_format: Any) -> str:
    """What tells whether a set of shards changed, without reading them: each shard's location, and its size and
    modification time when it is a local file (a URL's content is not looked at)."""
    digest = hashlib.sha256(caption_format.describe().encode())
    for location in caption_format.locations(source):
        path = Path(location) if Path(location).is_absolute() else Path(source) / location
        stat = path.stat() if "://" not in location and path.is_file() else None
        digest.update(
            json.dumps([location, stat.st_size if stat else None, stat.st_mtime_ns if stat else None]).encode()
        )
    return digest.hexdigest()


def _styles(rest: list) -> tuple[str | None, ...]:
    """An index line's styles (its third element, written where the record has any)."""
    return tuple(rest[0]) if rest else ()
