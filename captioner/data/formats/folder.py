"""An image folder with a `.txt` file beside each picture: one caption per non-empty line."""

from __future__ import annotations

from pathlib import Path

from captioner.core.errors import CaptionerError
from captioner.data.formats.base import CaptionFormat
from captioner.sources.images import find_images
from captioner.sources.records import CaptionRecord, DataReport, RecordBuilder


class TextFolder(CaptionFormat):
    """Pictures anywhere under the folder, each with `<name>.txt` beside it (`cat.jpg` and `cat.txt`).

    The layout of most image-text sets prepared for training generative
    models. Pictures without a text file, and text files that are empty, are
    counted and skipped.
    """

    looks_for = "pictures with a .txt file of the same name beside them"

    def locate(self, folder: Path) -> Path | None:
        scan = find_images(folder)
        return folder if any(image.with_suffix(".txt").is_file() for image in scan.images) else None

    def read(self, source: Path, report: DataReport) -> tuple[list[CaptionRecord], Path]:
        builder = RecordBuilder(source, report)
        for image in find_images(source).images:
            name = image.relative_to(source).as_posix()
            text_file = image.with_suffix(".txt")
            if not text_file.is_file():
                report.count("pictures without a .txt file", name)
                continue
            try:
                lines = text_file.read_text(encoding="utf-8-sig").splitlines()
            except UnicodeDecodeError as error:
                raise CaptionerError(f"{text_file} is not UTF-8 text ({error}); save it as UTF-8.") from error
            builder.add(name)
            for number, line in enumerate(lines, 1):
                if line.strip():
                    builder.add(name, line, where=f"{text_file.name} line {number}")
        return builder.build(source), source
