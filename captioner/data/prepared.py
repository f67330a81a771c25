"""Prepared data (the dataset's place, splits, vocabulary) kept per settings, so runs never share them by mistake.

Every setting that shapes the prepared data (where the data is, its format,
the split settings, the vocabulary settings) goes into a key; the files live
in `<work_dir>/prepared/<key>/`:

    settings.json   the settings the key was made from (for people)
    splits.json     the image-level splits
    vocab.json      the vocabulary, built from the training captions
    dataset.json    where the images are and a fingerprint of the records;
                    written last, it marks the preparation complete

Runs of a sweep over any of these settings (in parallel or one after the
other) each get their own folder, and a later `test` of an earlier run's
checkpoint finds that run's vocabulary again. If the data itself changes under
the same settings, preparation stops rather than replacing a split that
checkpoints were tested on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.core.errors import CaptionerError
from captioner.core.files import read_json, require_keys, write_json

PREPARED_VERSION = 1


def preparation_key(settings: dict[str, Any]) -> str:
    """A digest of the settings (JSON-ready values) that shape the prepared data."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class PreparedData:
    """The folder of one preparation and its files."""

    folder: Path

    @classmethod
    def for_settings(cls, work_dir: str | Path, settings: dict[str, Any]) -> PreparedData:
        return cls(Path(work_dir) / "prepared" / preparation_key(settings)[:16])

    @property
    def splits_file(self) -> Path:
        return self.folder / "splits.json"

    @property
    def vocab_file(self) -> Path:
        return self.folder / "vocab.json"

    @property
    def dataset_file(self) -> Path:
        return self.folder / "dataset.json"

    @property
    def complete(self) -> bool:
        return self.dataset_file.is_file()

    def write_settings(self, settings: dict[str, Any]) -> None:
        write_json(self.folder / "settings.json", settings)

    def check_records(self, fingerprint: str, data_dir: str) -> None:
        """Refuse data that changed since this folder was prepared from it with the same settings.

        Raises:
            CaptionerError: Naming the folder and what to do.
        """
        if self.complete and self.read_dataset()["records"] != fingerprint:
            raise CaptionerError(
                f"The captions or images under {data_dir} changed since {self.folder} was prepared from them with "
                "these settings. Reusing its split would mix images across splits, replacing it would move the test "
                f"set under existing checkpoints. Use another --data.work_dir, or delete {self.folder} to prepare anew."
            )

    def write_dataset(
        self, root: Path, images_dir: Path, caption_format: str, fingerprint: str, sharded: bool = False
    ) -> None:
        """Record where the images are (`sharded`: inside shards, not as files) and mark the preparation complete."""
        write_json(
            self.dataset_file,
            {
                "version": PREPARED_VERSION,
                "root": str(root.resolve()),
                "images_dir": str(images_dir.resolve()),
                "format": caption_format,
                "records": fingerprint,
                "sharded": sharded,
            },
        )

    def read_dataset(self) -> dict[str, Any]:
        """The dataset record, checked.

        Raises:
            CaptionerError: When the preparation is missing or the file malformed.
        """
        if not self.complete:
            raise CaptionerError(
                f"{self.folder} holds no prepared data for these data settings; run `fit` (or call prepare_data()) "
                "first with the same --data options."
            )
        payload = read_json(self.dataset_file, "Prepared dataset")
        require_keys(
            payload, ("version", "root", "images_dir", "format", "records"), self.dataset_file, "Prepared dataset"
        )
        if payload["version"] != PREPARED_VERSION:
            raise CaptionerError(f"{self.dataset_file} has version {payload['version']}, expected {PREPARED_VERSION}.")
        payload.setdefault("sharded", False)  # prepared before shards were a source
        return payload
