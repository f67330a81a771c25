"""Reading WebDataset tar shards, as img2dataset writes them (`pip install 'captioner[shards]'`): where they are (a
folder, a brace pattern, object-store URLs) and their samples as a stream, never unpacked to disk. A low room:
the caption format (`captioner.data.formats.webdataset`), feature extraction and bulk captioning all read shards
through it.

An image inside a shard is named `<shard>#<member>` (`00003.tar#000030012.jpg`): the shard relative to the data
folder (or its URL) and the image's name inside it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from captioner.core.errors import CaptionerError
from captioner.sources.records import DataReport

SHARD_SEPARATOR = "#"
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
URL_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def _webdataset(module: str = "webdataset") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CaptionerError(
            "WebDataset shards need the webdataset package: pip install 'captioner[shards]'."
        ) from None


def is_url(location: str) -> bool:
    """Whether a shard location is a URL (s3://, gs://, https://, pipe:...) rather than a local path."""
    return bool(URL_SCHEME.match(location)) and not re.match(r"^[a-z]:[\\/]", location, re.IGNORECASE)


def shard_locations(folder: Path, shards: str | None) -> list[str]:
    """The shards to read: every `*.tar` under `folder` (sorted), or `shards` expanded (a brace pattern such as
    `shards/{00000..00099}.tar`, relative to `folder` unless it is absolute or a URL; `::` separates several)."""
    if shards is None:
        return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.tar") if path.is_file())
    expanded = _webdataset("webdataset.shardlists").expand_urls(shards)
    return [location for location in expanded]


def shard_path(folder: Path, location: str) -> str:
    """Where to open a shard from: a URL as it is, a relative path under `folder`."""
    return location if is_url(location) or Path(location).is_absolute() else str(folder / location)


def split_member(key_and_name: str) -> tuple[str, str]:
    """`<key>.<ext...>` -> (key, ext): as WebDataset groups members, at the first dot of the base name."""
    directory, _, base = key_and_name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def shard_samples(
    location: str, report: DataReport | None = None, wanted: Any = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one shard, in order: `(key, {extension: bytes})`, members of one key grouped.

    Args:
        location: A local path or URL (opened with webdataset's `gopen`: local files, pipe:, http(s), s3 and gs
            through their command-line tools).
        report: Counts a shard cut short (what came before the damage is kept).
        wanted: Reads only the members whose extension it holds (a set); the others are skipped unread.

    Raises:
        CaptionerError: When the shard cannot be opened.
    """
    gopen = _webdataset("webdataset.gopen").gopen
    iterator = _webdataset("webdataset.tariterators").tar_file_iterator

    def select(name: str) -> bool:
        return wanted is None or split_member(name)[1] in wanted

    broken: list[Exception] = []

    def stop(error: Exception) -> bool:  # a truncated or corrupt shard: keep what was read, count it
        broken.append(error)
        return False

    try:
        stream = gopen(location, "rb")
    except Exception as error:  # gopen raises many types: missing file, failed pipe, unknown scheme
        raise CaptionerError(f"Cannot open the shard {location} ({type(error).__name__}: {error}).") from error
    key, members = None, {}
    with stream:
        for member in iterator(stream, skip_meta=None, handler=stop, select_files=select):
            member_key, extension = split_member(member["fname"])
            if member_key != key or extension in members:  # a new sample (a member met twice starts one too)
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            members[extension] = member["data"]
    if key is not None:
        yield key, members
    if broken and report is not None:
        report.count("shards cut short (read up to the damage)", f"{location}: {broken[0]}")


def shard_of(file_name: str) -> tuple[str, str]:
    """A record's `<shard>#<member>` name split into the shard and the member's key."""
    location, separator, member = file_name.rpartition(SHARD_SEPARATOR)
    if not separator:
        raise CaptionerError(f"{file_name} does not name an image inside a shard (<shard>{SHARD_SEPARATOR}<member>).")
    return location, split_member(member)[0]
