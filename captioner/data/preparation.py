"""Preparing a caption set once, for every later run: fetched (or found, or generated), read in its format, split at
the image level, and the tokenizer built on the training captions, all under `work_dir` (`captioner.data.prepared`:
a folder per set of settings, marked complete at the end). The datamodule runs it once per node.

A format that streams (WebDataset shards) is read a shard at a time into per-shard index files with splits by hash
(`captioner.data.sharded`): no process holds every record.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.core.errors import CaptionerError
from captioner.core.files import read_json, write_json
from captioner.data.download import find_caption_set, read_caption_set, resolve_dataset
from captioner.data.formats import CaptionFormat
from captioner.data.options import Captions, Origin, Splits
from captioner.data.prepared import PreparedData
from captioner.data.sharded import SHARDED_FILE, ShardedRecords, index_shards, shards_fingerprint
from captioner.data.splits import (
    SPLITS,
    label_from_split_file,
    load_splits,
    make_splits,
    records_fingerprint,
    save_splits,
)
from captioner.sources.records import CaptionRecord, DataReport
from captioner.text.base import TokenizerRecipe, tokenizer_from_dict, tokenizer_to_dict
from captioner.text.styles import all_training_texts, dataset_styles
from captioner.text.words import Words, normalize

log = logging.getLogger("captioner.data.datamodule")


def load_tokenizer(path: Path) -> Any:
    """The prepared tokenizer (`vocab.json`), whichever kind it is, validated."""
    return tokenizer_from_dict(read_json(path, "Tokenizer"), str(path))


@dataclass
class Preparation:
    """What preparing a caption set takes (see the module docstring).

    Attributes:
        work_dir: Where prepared data is kept.
        data_dir: The folder of captions and images (None: `origin`'s Kaggle dataset).
        caption_format: The format (None: the first found in the folder).
        origin: Where the data comes from when `data_dir` does not say.
        splits: How images are split.
        captions: How captions are kept.
        tokenizer: How captions become tokens.
    """

    work_dir: Path
    data_dir: str | None
    caption_format: CaptionFormat | None
    origin: Origin
    splits: Splits
    captions: Captions
    tokenizer: TokenizerRecipe

    def settings(self) -> dict[str, Any]:
        """Everything that shapes the prepared splits and vocabulary: the prepared folder's key (the same keys as
        captioner 0.3 wrote, so its prepared data is found again)."""
        source = (
            str(Path(self.data_dir).expanduser().resolve())
            if self.data_dir is not None
            else f"kaggle:{self.origin.kaggle_dataset}/{self.origin.kaggle_version}"
        )
        split_file = None
        if self.splits.file is not None:
            path = Path(self.splits.file).expanduser()
            if not path.is_file():
                raise CaptionerError(f"--data.splits.file {path} does not exist.")
            split_file = {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        settings = {
            "source": source,
            "format": self.caption_format.describe() if self.caption_format is not None else None,
            "synthetic_images": self.origin.synthetic_images,
            "split_file": split_file,
            "restval": self.splits.restval,
            "val_size": self.splits.val_size,
            "test_size": self.splits.test_size,
            "split_seed": self.splits.seed,
            "min_word_count": self.captions.min_word_count,
            "max_caption_length": self.captions.max_length,
        }
        if self.origin.synthetic_styles:  # only where asked for: older data keeps its key
            settings["synthetic_styles"] = True
        if not isinstance(self.tokenizer, Words) or self.tokenizer.min_count is not None:
            settings["tokenizer"] = self.tokenizer.describe()  # the default word vocabulary: older data's keys
        return settings

    def prepared(self) -> PreparedData:
        return PreparedData.for_settings(self.work_dir, self.settings())

    def _build_tokenizer(self, train_records: Callable[[], Iterable[CaptionRecord]]) -> Any:
        """The tokenizer of the training captions, with their styles (`captioner.text.styles`): a styled dataset's
        captions are learnt with their style's marker, and the tokenizer keeps the styles (the default first)."""
        styles = dataset_styles(train_records())
        texts = all_training_texts(train_records(), styles)
        tokenizer = self.tokenizer.build(texts, self.captions.max_length, self.captions.min_word_count)
        if styles:
            tokenizer.styles = styles
            log.info("Caption styles: %s (the default first).", ", ".join(styles))
        return tokenizer

    def run(self) -> DataReport:
        """Fetch, read, split and build the tokenizer (each step skipped if done).

        Returns:
            What was kept and skipped (summarised once the features are extracted: undecodable images count too).
        """
        settings = self.settings()
        prepared = PreparedData.for_settings(self.work_dir, settings)
        origin = self.origin
        root = resolve_dataset(
            self.data_dir,
            origin.kaggle_dataset,
            origin.kaggle_version,
            origin.synthetic_images,
            origin.synthetic_styles,
        )
        caption_format, source = find_caption_set(root, self.caption_format)
        if getattr(caption_format, "streams", False):
            return self._run_sharded(prepared, root, source, caption_format, settings)
        records, images_dir, caption_format, report = read_caption_set(root, self.caption_format)
        if self.splits.file is not None:
            records = label_from_split_file(records, self.splits.file, report)
        fingerprint = records_fingerprint(records)
        prepared.check_records(fingerprint, str(root))
        if not prepared.complete:
            prepared.write_settings(settings)
            splits = make_splits(
                records, self.splits.val_size, self.splits.test_size, self.splits.seed, self.splits.restval
            )
            save_splits(prepared.splits_file, splits, settings)
            tokenizer = self._build_tokenizer(lambda: splits["train"])
            write_json(prepared.vocab_file, tokenizer_to_dict(tokenizer))
            prepared.write_dataset(root, images_dir, caption_format.describe(), fingerprint)  # marks it complete
        splits, _ = load_splits(prepared.splits_file)
        vocabulary = load_tokenizer(prepared.vocab_file)
        log.info(
            "Prepared data in %s: %s; %s.",
            prepared.folder,
            ", ".join(f"{len(splits[n])} {n}" for n in SPLITS),
            vocabulary.describe(),
        )
        report.long_captions = sum(len(normalize(c)) > self.captions.max_length for r in records for c in r.captions)
        return report

    def _run_sharded(
        self, prepared: PreparedData, root: Path, source: Path, caption_format: CaptionFormat, settings: dict[str, Any]
    ) -> DataReport:
        """The records pass over shards, once: index files, hash splits, the tokenizer from a pass over training
        captions; validation and test records (few) kept in splits.json, training records in the shard index.

        Raises:
            CaptionerError: With a split file (it names image files, not images inside shards), or when the shards
                changed since the data was prepared from them.
        """
        if self.splits.file is not None:
            raise CaptionerError(
                "--data.splits.file names image files; images inside shards are split by a hash of "
                "their names (--data.splits.val_size, test_size, seed)."
            )
        prepared.check_records(shards_fingerprint(source, caption_format), str(root))
        if prepared.complete:
            sharded = ShardedRecords.read(prepared.folder / SHARDED_FILE)
            report = DataReport(
                images=sum(c["images"] for c in sharded.counts.values()),
                captions=sum(c["captions"] for c in sharded.counts.values()),
            )
        else:
            prepared.write_settings(settings)
            report = DataReport()
            log.info("Reading %s as %s, a shard at a time", source, caption_format.describe())
            sharded = index_shards(
                caption_format.shard_records(source, report),
                prepared.folder,
                self.splits.val_size,
                self.splits.test_size,
                self.splits.seed,
                report,
            )
            evaluated = {"train": [], "val": [], "test": []}
            for record in sharded.records():
                if record.split != "train":
                    evaluated[record.split].append(record)
            save_splits(prepared.splits_file, evaluated, settings)  # training records stay in the shard index
            tokenizer = self._build_tokenizer(lambda: sharded.records("train"))
            write_json(prepared.vocab_file, tokenizer_to_dict(tokenizer))
            prepared.write_dataset(
                root, source, caption_format.describe(), shards_fingerprint(source, caption_format), sharded=True
            )
        log.info(
            "Prepared data in %s: %s; %s.",
            prepared.folder,
            ", ".join(f"{sharded.counts[n]['images']} {n}" for n in SPLITS),
            load_tokenizer(prepared.vocab_file).describe(),
        )
        return report
