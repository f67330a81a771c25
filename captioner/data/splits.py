"""Image-level train/val/test splits: drawn from a hash of each image's key, or taken from the data's own labels.

Splitting by image (not by caption) keeps every caption of a test image out of
training. Karpathy split files (as a caption format, or `--data.splits.file`)
label each image train, val, test or restval; restval goes to training unless
`restval` says to drop it. Otherwise an image's place is a hash of its key (its
file name without folder and extension, `Images/cat.jpg` -> `cat`; inside a
shard, the member's key) under the split seed: test takes the images with
the smallest hashes, validation the next ones. The same rule splits web-scale
shards (`captioner.data.sharded`), so the same images in a folder or in shards
fall in the same splits, and adding images never moves one already placed.
The split is saved with the prepared data (`captioner.data.prepared`) and reused
by every later run with the same settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from captioner.core.errors import CaptionerError
from captioner.core.files import read_json, require_keys, write_json
from captioner.data.formats.karpathy import read_karpathy_entries
from captioner.sources.records import STYLE_NAME, CaptionRecord, DataReport
from captioner.sources.shards import SHARD_SEPARATOR, split_member

SPLITS = ("train", "val", "test")
SPLITS_VERSION = 2


def image_key(file_name: str) -> str:
    """The name an image's split is drawn from: its file name without folder and extension, up to the first dot as
    WebDataset groups members (`Images/cat.jpg` -> `cat`; inside a shard, `00003.tar#cat.jpg` -> `cat`), so one
    image named by a COCO file, a CSV or a shard member splits the same, and re-sharding a set keeps its splits."""
    base = file_name.rpartition(SHARD_SEPARATOR)[2].rpartition("/")[2]
    return split_member(base)[0] or base


def key_hash(name: str, seed: int) -> int:
    """A 64-bit hash of a name under the split seed (uniform: the split draws on it)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def records_fingerprint(records: list[CaptionRecord]) -> str:
    """A digest of the file names, captions, ids and split labels, to tell whether the data changed."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: r.file_name):
        entry = [record.file_name, list(record.captions), record.image_id, record.split]
        if record.styles:  # unstyled data keeps the digest it had before styles existed
            entry.append(list(record.styles))
        digest.update(json.dumps(entry, ensure_ascii=False, default=str).encode())
    return digest.hexdigest()


def resolve_split_size(size: int | float, total: int, name: str) -> int:
    """Turn a count or a fraction into a number of images.

    Args:
        size: A count (int) or a fraction of `total` (float in (0, 1)).
        total: The number of images available.
        name: The split's name, for the message.

    Raises:
        CaptionerError: When the size is negative or not a count or fraction.
    """
    if isinstance(size, float) and not size.is_integer():
        if not 0 < size < 1:
            raise CaptionerError(f"--data.splits.{name}_size {size} must be a count or a fraction between 0 and 1.")
        return max(1, round(size * total))
    if size < 0:
        raise CaptionerError(f"--data.splits.{name}_size {size} must not be negative.")
    return int(size)


def split_records(
    records: list[CaptionRecord], val_size: int | float, test_size: int | float, seed: int
) -> dict[str, list[CaptionRecord]]:
    """Cut images into train, val and test by the hash of their keys under `seed` (see the module docstring).

    The result depends only on the set of records, the sizes and the seed, never
    on the order the records came in; an image's place depends on its key alone.

    Raises:
        CaptionerError: When the sizes leave no training image.
    """
    ordered = sorted(records, key=lambda r: (key_hash(image_key(r.file_name), seed), r.file_name))
    n_val = resolve_split_size(val_size, len(ordered), "val")
    n_test = resolve_split_size(test_size, len(ordered), "test")
    if n_val + n_test >= len(ordered):
        raise CaptionerError(
            f"Split sizes val={n_val} and test={n_test} leave no training image out of {len(ordered)}: "
            "lower --data.splits.val_size / test_size (a fraction such as 0.1 adapts to the data)."
        )
    test, val, train = ordered[:n_test], ordered[n_test : n_test + n_val], ordered[n_test + n_val :]
    return {name: sorted(part, key=lambda r: r.file_name) for name, part in zip(SPLITS, (train, val, test))}


def label_from_split_file(records: list[CaptionRecord], path: str | Path, report: DataReport) -> list[CaptionRecord]:
    """The records with the split labels of a Karpathy split file, matched by file name (without folders).

    Images of the data that the file does not name are dropped; images the file
    names that the data lacks are counted. Both go into the summary.

    Raises:
        CaptionerError: When the file is unreadable or shares no image with the data.
    """
    path = Path(path)
    label_of = {Path(str(entry["filename"])).name: entry["split"] for entry in read_karpathy_entries(path)}
    labelled, seen = [], set()
    for record in records:
        name = Path(record.file_name).name
        if name not in label_of:
            report.count("images the split file does not name (left out)", record.file_name)
            continue
        seen.add(name)
        labelled.append(record.with_split(label_of[name]))
    missing = [name for name in label_of if name not in seen]
    if missing:
        report.count("images the split file names that the data lacks", missing[0], times=len(missing))
    if not labelled:
        raise CaptionerError(
            f"--data.splits.file {path} names none of the data's images: is it the file for this data?"
        )
    return labelled


def split_by_labels(records: list[CaptionRecord], restval: Literal["train", "drop"] = "train") -> dict[str, list]:
    """Train, val and test from the records' own split labels; restval joins train or is dropped.

    Raises:
        CaptionerError: When a split would be empty.
    """
    splits: dict[str, list[CaptionRecord]] = {name: [] for name in SPLITS}
    for record in records:
        label = "train" if record.split == "restval" and restval == "train" else record.split
        if label in splits:
            splits[label].append(record)
    for name, part in splits.items():
        if not part:
            raise CaptionerError(f"The split labels leave the {name} split empty ({len(records)} labelled images).")
    return {name: sorted(part, key=lambda r: r.file_name) for name, part in splits.items()}


def save_splits(path: str | Path, splits: dict[str, list[CaptionRecord]], settings: dict) -> None:
    """Write the splits (file names, captions, ids) and the settings that made them, atomically."""
    write_json(
        path,
        {
            "version": SPLITS_VERSION,
            "settings": settings,
            "splits": {name: [_entry(record) for record in splits[name]] for name in SPLITS},
        },
    )


def _entry(record: CaptionRecord) -> list:
    """A record in a splits file: file name, captions, id, and the captions' styles where it has any."""
    entry = [record.file_name, list(record.captions), record.image_id]
    return entry + [list(record.styles)] if record.styles else entry


def _record(entry: list, split: str) -> CaptionRecord:
    """A splits file's entry read back, its styles checked (one per caption, each a name or null)."""
    captions = tuple(map(str, entry[1]))
    styles = tuple(entry[3]) if len(entry) > 3 else ()
    if styles and (
        len(styles) != len(captions)
        or not all(style is None or (isinstance(style, str) and STYLE_NAME.fullmatch(style)) for style in styles)
    ):
        raise ValueError(f"the styles of {entry[0]} are not one name (or null) per caption")
    return CaptionRecord(str(entry[0]), captions, entry[2], split, styles)


def load_splits(path: str | Path) -> tuple[dict[str, list[CaptionRecord]], dict]:
    """Read splits written by `save_splits`, checking their structure.

    Returns:
        The splits and the settings they were made with.

    Raises:
        CaptionerError: When the file is missing, malformed, or of another version.
    """
    payload = read_json(path, "Splits")
    require_keys(payload, ("version", "settings", "splits"), path, "Splits")
    if payload["version"] != SPLITS_VERSION:
        raise CaptionerError(f"Splits file {path} has version {payload['version']}, expected {SPLITS_VERSION}.")
    try:
        splits = {name: [_record(entry, name) for entry in payload["splits"][name]] for name in SPLITS}
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise CaptionerError(f"Splits file {path} is malformed ({error!r}); delete it to make it again.") from error
    return splits, payload["settings"]


def make_splits(
    records: list[CaptionRecord],
    val_size: int | float,
    test_size: int | float,
    seed: int,
    restval: Literal["train", "drop"] = "train",
) -> dict[str, list[CaptionRecord]]:
    """The splits for these records: from their labels when they all have one, else drawn with the seed."""
    if records and all(record.split is not None for record in records):
        return split_by_labels(records, restval)
    return split_records(records, val_size, test_size, seed)
