"""Where extraction reads images from, a *part* at a time: a run of a folder's image files, or one WebDataset shard.

A part is the unit of extraction's work: written whole, skipped once done (a
killed run resumes at the parts it had not finished), and shared out over the
ranks of a distributed run (part i to rank i mod W).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.sources.records import CaptionRecord
from captioner.sources.shards import IMAGE_MEMBERS, SHARD_SEPARATOR, shard_path, shard_samples

IMAGES_PER_FOLDER_PART = 1000


@dataclass
class ImagePart:
    """Some images, read in one pass.

    Attributes:
        name: A stable, file-system-safe name (the part's files are named after it).
        names: The images' names, in the order their features are kept.
    """

    name: str
    names: list[str]

    def images(self) -> Iterator[tuple[str, bytes | BaseException]]:
        """`(name, encoded image)` for each of `names` found (the error in place of bytes that cannot be read)."""
        raise NotImplementedError

    def records(self) -> list[CaptionRecord] | None:
        """The part's records (each with its split), when the part knows them (a shard's index); None otherwise."""
        return None


@dataclass
class FilePart(ImagePart):
    """Image files of a folder."""

    folder: Path = field(default_factory=Path)

    def images(self) -> Iterator[tuple[str, bytes | BaseException]]:
        for name in self.names:
            try:
                yield name, (self.folder / name).read_bytes()
            except OSError as error:
                yield name, error


@dataclass
class ShardPart(ImagePart):
    """The images of one input shard, read as a stream (never unpacked to disk)."""

    location: str = ""
    folder: Path = field(default_factory=Path)

    def images(self) -> Iterator[tuple[str, bytes | BaseException]]:
        wanted, done = set(self.names), set()
        for key, members in shard_samples(shard_path(self.folder, self.location), wanted=set(IMAGE_MEMBERS)):
            extension = next((e for e in IMAGE_MEMBERS if e in members), None)
            name = f"{self.location}{SHARD_SEPARATOR}{key}.{extension}"
            if name in wanted and name not in done:  # a key met twice: the first, as the records kept
                done.add(name)
                yield name, members[extension]
        for name in self.names:
            if name not in done:
                yield name, FileNotFoundError(f"not found in its shard {self.location}")


@dataclass
class IndexedShardPart(ShardPart):
    """One input shard of a sharded set (`captioner.data.sharded`), its images and records read from its index file
    when the part is worked on: no process holds the records of every shard."""

    index: Any = None
    number: int = 0

    def records(self) -> list[CaptionRecord]:
        return self.index.shard_records(self.number)

    def images(self) -> Iterator[tuple[str, bytes | BaseException]]:
        self.names = [record.file_name for record in self.records()]
        yield from super().images()


def indexed_parts(index: Any, folder: Path) -> list[IndexedShardPart]:
    """One part per shard of a sharded set, in shard order."""
    return [
        IndexedShardPart(
            f"shard-{number:06d}-{Path(location).stem}"[:120],
            [],
            location=location,
            folder=Path(folder),
            index=index,
            number=number,
        )
        for number, location in enumerate(index.shards)
    ]


def folder_parts(names: list[str], folder: Path, per_part: int = IMAGES_PER_FOLDER_PART) -> list[FilePart]:
    """Runs of `per_part` image files, in the given order."""
    return [
        FilePart(f"images-{start // per_part:06d}", names[start : start + per_part], folder=Path(folder))
        for start in range(0, len(names), per_part)
    ]


def shard_parts(names: list[str], folder: Path) -> list[ShardPart]:
    """One part per input shard (in shard order), each with its images in the given order."""
    by_shard: dict[str, list[str]] = {}
    for name in names:
        by_shard.setdefault(name.rpartition(SHARD_SEPARATOR)[0], []).append(name)
    return [
        ShardPart(f"shard-{index:06d}-{Path(location).stem}"[:120], part, location=location, folder=Path(folder))
        for index, (location, part) in enumerate(sorted(by_shard.items()))
    ]


def image_parts(names: list[str], folder: Path, sharded: bool, per_part: int = IMAGES_PER_FOLDER_PART) -> list:
    """The parts extraction works through for these images: shards, or runs of a folder's files."""
    return shard_parts(names, folder) if sharded else folder_parts(names, folder, per_part)
