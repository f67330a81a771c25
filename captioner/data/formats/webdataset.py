"""WebDataset tar shards, as img2dataset writes them: `00000.tar` holding `<key>.jpg`, `<key>.txt` (the caption)
and `<key>.json` (metadata, with a `caption` field), in a folder, by a brace pattern or at an object-store URL;
`<key>.<style>.txt` members hold captions of a style (`captioner.text.styles`: `<key>.tags.txt`). Read as a stream
(`pip install 'captioner[shards]'`), never unpacked to disk.

Records name an image as `<shard>#<member>` (`00003.tar#000030012.jpg`): the
shard relative to the data folder (or its URL) and the image's name inside it.
Their features are extracted straight from the shards into streamed feature
shards (`captioner.features.streamed`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from captioner.core.errors import CaptionerError
from captioner.data.formats.base import CaptionFormat
from captioner.sources.records import CaptionRecord, DataReport, RecordBuilder, text_style
from captioner.sources.shards import (
    IMAGE_MEMBERS,
    SHARD_SEPARATOR,
    is_url,
    shard_locations,
    shard_of,
    shard_path,
    shard_samples,
)

__all__ = [
    "IMAGE_MEMBERS",
    "SHARD_SEPARATOR",
    "WebDataset",
    "CaptionMembers",
    "captions_of",
    "styled_captions_of",
    "is_url",
    "shard_locations",
    "shard_path",
    "shard_samples",
]


class CaptionMembers:
    """The members a sample's records are read from: its image, `.txt`, `.json`, and `.<style>.txt` members (captions
    of a style, `captioner.text.styles`); `in` tells whether an extension is one of them."""

    def __contains__(self, extension: object) -> bool:
        if extension in {*IMAGE_MEMBERS, "txt", "json"}:
            return True
        return isinstance(extension, str) and text_style(extension) is not None


def styled_captions_of(members: dict[str, bytes]) -> list[tuple[str, str]]:
    """A sample's captions of a style: the non-empty lines of each `<key>.<style>.txt` member, as (style, caption)."""
    found = []
    for extension in sorted(members):
        style = text_style(extension)
        if style is not None:
            text = members[extension].decode("utf-8", errors="replace")
            found += [(style, line) for line in text.splitlines() if line.strip()]
    return found


def captions_of(members: dict[str, bytes], caption_field: str) -> list[str] | None:
    """A sample's captions: the `.txt` member's non-empty lines, else the `.json` member's `caption_field` (a string
    or a list); None when it has neither."""
    if "txt" in members:
        return [line for line in members["txt"].decode("utf-8", errors="replace").splitlines() if line.strip()]
    if "json" in members:
        try:
            value = json.loads(members["json"]).get(caption_field)
        except (ValueError, AttributeError):
            return None
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [item for item in value if isinstance(item, str)]
    return None


class WebDataset(CaptionFormat):
    """img2dataset's WebDataset output: tar shards of `<key>.jpg` (or png, webp) with `<key>.txt` (one caption per
    line; img2dataset writes one) and `<key>.json` (used when there is no `.txt`: its `caption_field`).

    Images without a caption, captions without an image, and keys met twice
    are counted and skipped; an image that does not decode is counted when its
    features are extracted. A key's id in results files is `<shard>#<key>`.

    Args:
        shards: Which shards: a brace pattern (`{00000..00099}.tar`, `s3://bucket/cc3m/{00000..00331}.tar`),
            relative to the data folder unless absolute or a URL. None: every `*.tar` under the data folder.
        caption_field: The `.json` member's caption field.
    """

    looks_for = "WebDataset tar shards (*.tar, as img2dataset writes them)"
    streams = True  # its images are read from the shards, never as files: features go to streamed shards

    def __init__(self, shards: str | None = None, caption_field: str = "caption") -> None:
        self.shards, self.caption_field = shards, caption_field

    def locate(self, folder: Path) -> Path | None:
        if self.shards is not None:
            return folder
        return folder if any(path.is_file() for path in folder.rglob("*.tar")) else None

    def read(self, source: Path, report: DataReport) -> tuple[list[CaptionRecord], Path]:
        """Every shard's records at once (keys met twice across shards counted and skipped): for sets that fit in
        memory; the datamodule reads shards one at a time (`shard_records`, `captioner.data.sharded`)."""
        records, keys = [], set()
        for _, shard in self.shard_records(source, report):
            for record in shard:
                key = shard_of(record.file_name)[1]
                if key in keys:  # img2dataset's keys are unique across shards: the first one is kept
                    report.count("duplicate keys", record.file_name)
                    continue
                keys.add(key)
                records.append(record)
        if not records:
            raise CaptionerError(f"No usable image in {source}: {report.summary()}.")
        return records, source

    def locations(self, source: Path) -> list[str]:
        """The shards this format reads under `source`, in order."""
        return shard_locations(source, self.shards)

    def shard_records(self, source: Path, report: DataReport) -> Iterator[tuple[str, list[CaptionRecord]]]:
        """Each shard's location and records (in the shard's order), one shard at a time: images without a caption
        and captions without an image counted and skipped, keys met twice within a shard too (across shards, the
        reader of all of them tells)."""
        locations = shard_locations(source, self.shards)
        if not locations:
            raise CaptionerError(f"No shard matches {self.shards or '*.tar'} in {source}.")
        wanted = CaptionMembers()
        for location in locations:
            sizes: dict[str, int] = {}
            builder, keys = RecordBuilder(source, report, sizes=sizes), set()
            for key, members in shard_samples(shard_path(source, location), report, wanted):
                where = f"{location}{SHARD_SEPARATOR}{key}"
                if key in keys:
                    report.count("duplicate keys", where)
                    continue
                keys.add(key)
                image = next((extension for extension in IMAGE_MEMBERS if extension in members), None)
                captions, styled = captions_of(members, self.caption_field), styled_captions_of(members)
                if image is None:
                    if captions is not None or styled:
                        report.count("captions without an image", where)
                    continue
                name = f"{location}{SHARD_SEPARATOR}{key}.{image}"
                sizes[name] = len(members[image])
                builder.add(name, where=where)
                for caption in captions or ():
                    builder.add(name, caption, where=where)
                for style, caption in styled:
                    builder.add(name, caption, where=where, style=style)
            yield location, builder.build(source, require_some=False)
