"""Deterministic image-level train/val/test splits, persisted beside the prepared data.

Splitting by image (not by caption) keeps every caption of a test image out of
training. The split is saved once and reused by every later run and
subcommand; if the records or the split settings change, the saved split is
refused rather than silently replaced, because a checkpoint evaluated on a
different test split gives numbers that mean something else.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from captioner.data.coco import CaptionRecord
from captioner.errors import CaptionerError
from captioner.files import read_json, require_keys, write_json

SPLITS = ("train", "val", "test")
SPLITS_VERSION = 1


def records_fingerprint(records: list[CaptionRecord]) -> str:
    """A digest of the file names and captions, to tell whether a saved split still fits."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: r.file_name):
        digest.update(json.dumps([record.file_name, list(record.captions)], ensure_ascii=False).encode())
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
            raise CaptionerError(f"--data.{name}_size {size} must be a count or a fraction between 0 and 1.")
        return max(1, round(size * total))
    if size < 0:
        raise CaptionerError(f"--data.{name}_size {size} must not be negative.")
    return int(size)


def split_records(
    records: list[CaptionRecord], val_size: int | float, test_size: int | float, seed: int
) -> dict[str, list[CaptionRecord]]:
    """Shuffle images with `seed` and cut them into train, val and test.

    The result depends only on the set of records, the sizes and the seed,
    never on the order the records came in.

    Raises:
        CaptionerError: When the sizes leave no training image.
    """
    ordered = sorted(records, key=lambda r: r.file_name)
    n_val = resolve_split_size(val_size, len(ordered), "val")
    n_test = resolve_split_size(test_size, len(ordered), "test")
    if n_val + n_test >= len(ordered):
        raise CaptionerError(
            f"Split sizes val={n_val} and test={n_test} leave no training image out of {len(ordered)}: "
            "lower --data.val_size / --data.test_size (a fraction such as 0.1 adapts to the data)."
        )
    random.Random(seed).shuffle(ordered)
    test, val, train = ordered[:n_test], ordered[n_test : n_test + n_val], ordered[n_test + n_val :]
    return {name: sorted(part, key=lambda r: r.file_name) for name, part in zip(SPLITS, (train, val, test))}


def save_splits(path: str | Path, splits: dict[str, list[CaptionRecord]], settings: dict) -> None:
    """Write the splits (file names and captions) and the settings that made them, atomically."""
    write_json(
        path,
        {
            "version": SPLITS_VERSION,
            "settings": settings,
            "splits": {name: [[r.file_name, list(r.captions)] for r in splits[name]] for name in SPLITS},
        },
    )


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
        splits = {
            name: [
                CaptionRecord(str(file_name), tuple(map(str, captions)))
                for file_name, captions in payload["splits"][name]
            ]
            for name in SPLITS
        }
    except (KeyError, TypeError, ValueError) as error:
        raise CaptionerError(f"Splits file {path} is malformed ({error!r}); delete it to make it again.") from error
    return splits, payload["settings"]


def prepare_splits(
    path: str | Path, records: list[CaptionRecord], val_size: int | float, test_size: int | float, seed: int
) -> dict[str, list[CaptionRecord]]:
    """Load the saved splits if they were made from these records and settings, else make and save them.

    Raises:
        CaptionerError: When a saved split was made from other records or settings.
    """
    path = Path(path)
    settings = {
        "val_size": val_size,
        "test_size": test_size,
        "seed": seed,
        "records": records_fingerprint(records),
    }
    if path.exists():
        splits, saved = load_splits(path)
        if saved == settings:
            return splits
        changed = sorted(key for key in settings if saved.get(key) != settings[key])
        raise CaptionerError(
            f"{path} was made with other {', '.join(changed)} than this run's. Reusing it would mix "
            "images across splits, replacing it would move the test set under existing checkpoints. "
            f"Use another --data.work_dir, or delete {path} (and vocab.json beside it) to split anew."
        )
    splits = split_records(records, val_size, test_size, seed)
    save_splits(path, splits, settings)
    return splits
