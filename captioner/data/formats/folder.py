"""An image folder with a `.txt` file beside each picture: one caption per non-empty line; `<name>.<style>.txt`
beside it holds captions of a style (`captioner.text.styles`: `photo.txt` prose, `photo.tags.txt` tags)."""

from __future__ import annotations

from pathlib import Path

from captioner.core.errors import CaptionerError
from captioner.data.formats.base import CaptionFormat
from captioner.sources.images import find_images
from captioner.sources.records import CaptionRecord, DataReport, RecordBuilder, text_style


def caption_files(image: Path, listing: set[str]) -> list[tuple[str | None, Path]]:
    """The caption files beside a picture (`listing`: the names in its folder): `<stem>.txt` (no style), then each
    `<stem>.<style>.txt` in name order."""
    found = [(None, image.with_suffix(".txt"))] if f"{image.stem}.txt" in listing else []
    head = f"{image.stem}."
    for name in sorted(listing):
        style = text_style(name[len(head) :]) if name.startswith(head) else None
        if style is not None:
            found.append((style, image.with_name(name)))
    return found


class TextFolder(CaptionFormat):
    """Pictures anywhere under the folder, each with `<name>.txt` beside it (`cat.jpg` and `cat.txt`), and captions
    of a style in `<name>.<style>.txt` (`cat.tags.txt`).

    The layout of most image-text sets prepared for training generative
    models. Pictures without a text file, and text files that are empty, are
    counted and skipped.
    """

    looks_for = "pictures with a .txt file of the same name beside them"

    def locate(self, folder: Path) -> Path | None:
        scan, listings = find_images(folder), _Listings()
        return folder if any(caption_files(image, listings.of(image.parent)) for image in scan.images) else None

    def read(self, source: Path, report: DataReport) -> tuple[list[CaptionRecord], Path]:
        builder, listings = RecordBuilder(source, report), _Listings()
        for image in find_images(source).images:
            name = image.relative_to(source).as_posix()
            files = caption_files(image, listings.of(image.parent))
            if not files:
                report.count("pictures without a .txt file", name)
                continue
            builder.add(name)
            for style, text_file in files:
                try:
                    lines = text_file.read_text(encoding="utf-8-sig").splitlines()
                except UnicodeDecodeError as error:
                    raise CaptionerError(f"{text_file} is not UTF-8 text ({error}); save it as UTF-8.") from error
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        builder.add(name, line, where=f"{text_file.name} line {number}", style=style)
        return builder.build(source), source


class _Listings:
    """The file names of each folder, listed once (not a look-up per picture and style)."""

    def __init__(self) -> None:
        self.names: dict[Path, set[str]] = {}

    def of(self, folder: Path) -> set[str]:
        if folder not in self.names:
            try:
                self.names[folder] = {entry.name for entry in folder.iterdir() if entry.is_file()}
            except OSError:
                self.names[folder] = set()
        return self.names[folder]
