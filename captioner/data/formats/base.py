"""The caption format protocol, and finding which format a folder holds.

A format reads captions as some people have them and produces records
(`captioner.sources.records`); nothing downstream knows which format it was.
Adding one is one file here (or anywhere importable) with a `CaptionFormat`
subclass, and a config line naming it:

    data:
      format:
        class_path: my_package.MyFormat
        init_args: {file: captions.xml}

With no `format` set, the folder is searched for each known format in turn
(`KNOWN_FORMATS` in `captioner.data.formats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from captioner.core.errors import CaptionerError
from captioner.sources.records import CaptionRecord, DataReport


class CaptionFormat:
    """A way of writing captions down.

    Attributes:
        looks_for: What `locate` looks for, for the message when a folder holds no known format.
    """

    looks_for: ClassVar[str] = ""

    def locate(self, folder: Path) -> Path | None:
        """The file (or folder) this format would read in `folder`, or None when it holds none."""
        raise NotImplementedError

    def read(self, source: Path, report: DataReport) -> tuple[list[CaptionRecord], Path]:
        """Read `source` (what `locate` found) into records.

        Oddities that leave the rest usable are counted in `report`; a file that
        cannot be read at all raises.

        Returns:
            The records and the folder their file names are relative to.

        Raises:
            CaptionerError: Naming the file, the line or entry, and the reason.
        """
        raise NotImplementedError

    def describe(self) -> str:
        """The format's name and options, for messages and the prepared data's record."""
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"


def single_file(folder: Path, named: str | None, patterns: Sequence[str], what: str) -> Path | None:
    """The file `named` in `folder` if a name is given, else the one file matching `patterns`; None when absent.

    Raises:
        CaptionerError: When nothing is named and several files match (the user must name one).
    """
    if named:
        path = folder / named
        return path if path.is_file() else None
    found = sorted({path for pattern in patterns for path in folder.glob(pattern) if path.is_file()})
    if len(found) > 1:
        raise CaptionerError(
            f"{folder} holds several {what} files ({', '.join(p.name for p in found[:4])}): name the one to use "
            "with --data.format.file."
        )
    return found[0] if found else None


def find_format(folder: Path, formats: Sequence[CaptionFormat]) -> tuple[CaptionFormat, Path]:
    """The first of `formats` whose caption source `folder` holds.

    Raises:
        CaptionerError: When it holds none, naming what was looked for.
    """
    for caption_format in formats:
        found = caption_format.locate(folder)
        if found is not None:
            return caption_format, found
    wanted = "; ".join(f"{type(f).__name__}: {f.looks_for}" for f in formats)
    raise CaptionerError(
        f"--data.data_dir {folder} holds no caption set this project recognises. Looked for {wanted}. Point "
        "--data.data_dir at the folder holding one, or name the format and its file with --data.format."
    )
