"""CSV and TSV files with a header naming the image and caption columns, one row per caption."""

from __future__ import annotations

import csv
from pathlib import Path

from captioner.core.errors import CaptionerError
from captioner.data.formats.base import CaptionFormat, single_file
from captioner.sources.records import CaptionRecord, DataReport, RecordBuilder

STYLE_COLUMN = "style"  # an optional column: each caption's style (captioner.text.styles); empty for none


class Csv(CaptionFormat):
    """`image,caption` rows (several rows per image allowed), comma- or tab-separated.

    Image paths are relative to the file's folder, or absolute. Files may be
    UTF-8 with or without a byte-order mark, with Windows or Unix line ends, and
    quoted fields may hold commas, quotes and line breaks. Blank lines are
    ignored; empty captions, duplicate rows and rows with a missing image are
    counted and skipped. An optional `style` column gives each caption's style
    (`captioner.text.styles`: short, long, tags; empty for none).

    Args:
        file: The file, relative to the data folder (None: the one *.csv or *.tsv there).
        image_column: The header of the image path column.
        caption_column: The header of the caption column.
        delimiter: The field separator (None: a tab for .tsv files, else a comma).
    """

    looks_for = "one *.csv or *.tsv file with a header"

    def __init__(
        self,
        file: str | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        delimiter: str | None = None,
    ) -> None:
        self.file, self.image_column, self.caption_column, self.delimiter = (
            file,
            image_column,
            caption_column,
            delimiter,
        )

    def locate(self, folder: Path) -> Path | None:
        return single_file(folder, self.file, ["*.csv", "*.tsv"], "CSV/TSV")

    def read(self, source: Path, report: DataReport) -> tuple[list[CaptionRecord], Path]:
        delimiter = self.delimiter or ("\t" if source.suffix.lower() == ".tsv" else ",")
        builder = RecordBuilder(source.parent, report)
        try:
            with source.open(encoding="utf-8-sig", newline="") as handle:
                reader = csv.reader(handle, delimiter=delimiter, strict=True)
                header = next(reader, None)
                if header is None:
                    raise CaptionerError(f"{source} is empty: it needs a header naming the image and caption columns.")
                columns = [name.strip() for name in header]
                missing = [c for c in (self.image_column, self.caption_column) if c not in columns]
                if missing:
                    raise CaptionerError(
                        f"{source}, line 1: no column {' or '.join(map(repr, missing))} in the header "
                        f"({', '.join(map(repr, columns))}). Name the columns with --data.format.image_column and "
                        "--data.format.caption_column."
                    )
                image_at, caption_at = columns.index(self.image_column), columns.index(self.caption_column)
                style_at = columns.index(STYLE_COLUMN) if STYLE_COLUMN in columns else None
                for row in reader:
                    line = reader.line_num
                    if not any(field.strip() for field in row):
                        continue  # a blank line
                    if len(row) != len(columns):
                        report.count(f"rows with {len(row)} fields instead of {len(columns)}", f"line {line}")
                        continue
                    image = row[image_at].strip()
                    if not image:
                        report.count("rows without an image path", f"line {line}")
                        continue
                    style = row[style_at] if style_at is not None else None
                    builder.add(image, row[caption_at], where=f"line {line}", style=style)
        except UnicodeDecodeError as error:
            raise CaptionerError(f"{source} is not UTF-8 text ({error}); save it as UTF-8.") from error
        except csv.Error as error:
            raise CaptionerError(f"{source}, line {reader.line_num}: cannot be parsed as CSV ({error}).") from error
        return builder.build(source), source.parent
