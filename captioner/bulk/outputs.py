"""Where a bulk job's captions go, a part at a time, each part's output written atomically when the part is done
(the job's state records it done afterwards: a rerun, or a resumed killed run, skips the parts done; `--overwrite`
redoes them), each with its provenance (the job, the model, the settings, who captioned it and when):

- `txt`: a `.txt` beside each image (`photo.jpg` -> `photo.txt`; the layout LoRA and diffusion training sets use), in
  the input tree or mirrored under `--output`; images whose `.txt` exists are skipped one by one; the provenance is
  in the job's state (`.captioner-job/parts/<part>.json`);
- `jsonl`: `<output>/<part>.jsonl`, one row per image, and `<part>.provenance.json` beside it;
- `parquet`: `<output>/<part>.parquet` (pyarrow), the same columns, the provenance in the file's key-value metadata
  (`captioner.provenance`);
- `webdataset`: `<output>/<part>.tar`, each sample's members copied with the caption as `<key>.txt` (a `.txt` it
  had is kept as `<key>.original.txt`) and `<key>.json` holding the row and `captioned_by` (the job, the model's
  digest, captioner's version): shards that img2dataset's readers and `captioner.data.formats.WebDataset` read.

A row is `captioner.decoding.answers.ROW_FIELDS`: `image` (a path relative to the input, or `<shard>#<member>`),
`caption`, `score` (log-probability), `confidence` (calibrated, in [0, 1], for models fitted with one),
`alternatives` (`[{caption, score, ...}]` with `--num_return` > 1), `constraints_met` (with `--force_words`),
`clip_score` (CLIP-S, with `--rerank_clip`) and `error` (why an image has no caption).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captioner.bulk.inputs import InputPart, Sample
from captioner.core.errors import CaptionerError
from captioner.core.files import atomic_open, plain_file_mode, write_json
from captioner.core.parts import require_library

FORMATS = ("txt", "jsonl", "parquet", "webdataset")  # OUTPUTS' names, for the command line
PROVENANCE_KEY = "captioner.provenance"


class PartOutput:
    """One part's output while it is captioned: `add` rows as batches finish, `finish` puts it in place whole."""

    def add(self, rows: list[dict[str, Any]], samples: list[Sample]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        """Drop what was written (the part stays not done)."""


class Output:
    """Base class of output formats: which parts are done, an output per part."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def create(cls, folder: str | None, input_root: Path) -> Output:
        """The output into `folder` (`--output`).

        Raises:
            CaptionerError: When the format needs a folder and none was given.
        """
        if folder is None:
            raise CaptionerError(f"--format {cls.name} writes files into a folder: give it with --output.")
        return cls(Path(folder))

    def path(self, part: InputPart) -> Path:
        """The part's output file."""
        raise NotImplementedError

    def exists(self, part: InputPart) -> bool:
        """Whether the part's output is there (a job's records say whether it is complete)."""
        return self.path(part).exists()

    def wanted(self, part: InputPart, sample: Sample, overwrite: bool) -> bool:
        """Whether this image still needs a caption (all of a part's, unless the format keeps them one by one)."""
        return True

    def begin(self, part: InputPart, provenance: dict[str, Any]) -> PartOutput:
        """An output for the part, which records `provenance` as the format allows."""
        raise NotImplementedError

    def remove(self, part: InputPart) -> None:
        """Remove a part's output (`--overwrite`)."""
        self.path(part).unlink(missing_ok=True)


class _Rows(PartOutput):
    """Rows kept until the part is done, then written in one go (small: a caption per image)."""

    def __init__(self, write) -> None:
        self.rows, self.write = [], write

    def add(self, rows: list[dict[str, Any]], samples: list[Sample]) -> None:
        self.rows.extend(rows)

    def finish(self) -> None:
        self.write(self.rows)


class JsonlOutput(Output):
    """`<output>/<part>.jsonl`, its provenance in `<part>.provenance.json`."""

    name = "jsonl"

    def path(self, part: InputPart) -> Path:
        return self.folder / f"{part.name}.jsonl"

    def provenance_path(self, part: InputPart) -> Path:
        return self.folder / f"{part.name}.provenance.json"

    def begin(self, part: InputPart, provenance: dict[str, Any]) -> PartOutput:
        def write(rows: list[dict]) -> None:
            write_json(self.provenance_path(part), provenance)
            with atomic_open(self.path(part)) as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")

        return _Rows(write)

    def remove(self, part: InputPart) -> None:
        super().remove(part)
        self.provenance_path(part).unlink(missing_ok=True)


STYLE_COLUMN = "caption_"  # + a style's name: its caption (caption-set --styles)


def output_row(prediction: Any) -> dict[str, Any]:
    """A prediction as an output row: the shared row (`captioner.decoding.answers.ROW_FIELDS`), and with several
    caption styles asked for (`--styles`), a `caption_<style>` column for each (`caption` is the first style's)."""
    row = prediction.row()
    for style, caption in (prediction.styles or {}).items():
        row[f"{STYLE_COLUMN}{style}"] = caption
    return row


def style_columns(row: dict[str, Any]) -> list[str]:
    """A row's `caption_<style>` columns, in the order the styles were asked for."""
    return [name for name in row if name.startswith(STYLE_COLUMN)]


def caption_lines(row: dict[str, Any]) -> str:
    """A row's captions as a `.txt` holds them: one per line, each style's in the order asked for (sd-scripts and
    the LoRA trainers that read multi-line captions pick one line per epoch), or the one caption."""
    columns = style_columns(row)
    return "\n".join(row[name] for name in columns) if columns else row["caption"]


def row_schema(provenance: dict[str, Any] | None = None, styles: Sequence[str] = ()) -> Any:
    """The Arrow schema of rows (`captioner.decoding.answers.ROW_FIELDS`, then a `caption_<style>` column per style
    asked for), with the provenance as key-value metadata: the columns of every Parquet output (`caption-set --format
    parquet`, the Ray Data path)."""
    pa = require_library("pyarrow", "bulk", "Parquet output")
    alternative = pa.struct(
        [
            ("caption", pa.string()),
            ("score", pa.float64()),
            ("constraints_met", pa.bool_()),
            ("clip_score", pa.float64()),
        ]
    )
    return pa.schema(
        [
            ("image", pa.string()),
            ("caption", pa.string()),
            ("score", pa.float64()),
            ("confidence", pa.float64()),
            ("alternatives", pa.list_(alternative)),
            ("constraints_met", pa.bool_()),
            ("clip_score", pa.float64()),
            ("error", pa.string()),
            *((f"{STYLE_COLUMN}{style}", pa.string()) for style in styles),
        ],
        metadata=None if provenance is None else {PROVENANCE_KEY: json.dumps(provenance)},
    )


def rows_table(rows: list[dict[str, Any]], provenance: dict[str, Any] | None = None) -> Any:
    """Rows as an Arrow table of `row_schema`."""
    pa = require_library("pyarrow", "bulk", "Parquet output")
    styles = [name[len(STYLE_COLUMN) :] for name in style_columns(rows[0])] if rows else []
    schema = row_schema(provenance, styles)
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema)


class ParquetOutput(Output):
    """`<output>/<part>.parquet` (`pip install 'captioner[bulk]'`)."""

    name = "parquet"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.parquet = require_library("pyarrow.parquet", "bulk", "Parquet output")

    def path(self, part: InputPart) -> Path:
        return self.folder / f"{part.name}.parquet"

    def begin(self, part: InputPart, provenance: dict[str, Any]) -> PartOutput:
        def write(rows: list[dict]) -> None:
            table = rows_table(rows, provenance)
            with atomic_open(self.path(part), "wb") as handle:
                self.parquet.write_table(table, handle)

        return _Rows(write)


class _Tar(PartOutput):
    """A tar written as the part goes, renamed into place when done."""

    def __init__(self, path: Path, provenance: dict[str, Any]) -> None:
        self.path = path
        self.captioned_by = {key: provenance[key] for key in ("job", "model", "captioner") if key in provenance}
        self.tmp = path.with_name(f".{path.name}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tar = tarfile.open(self.tmp, "w")

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, rows: list[dict[str, Any]], samples: list[Sample]) -> None:
        for row, sample in zip(rows, samples, strict=True):
            if row["caption"] is None:
                continue  # nothing to train on: left out, and in the job's summary
            members = dict(sample.members) or {Path(sample.name).suffix.lstrip(".").lower() or "jpg": sample.data}
            if "txt" in members:
                members["original.txt"] = members.pop("txt")
            members["txt"] = caption_lines(row).encode()
            metadata = json.loads(members["json"]) if "json" in members else {}
            metadata.update(
                {name: value for name, value in row.items() if name not in ("image", "error")},
                source=sample.name,
                captioned_by=self.captioned_by,
            )
            members["json"] = json.dumps(metadata, ensure_ascii=False).encode()
            for extension, data in members.items():
                self._member(f"{sample.key}.{extension}", data)

    def finish(self) -> None:
        self.tar.close()
        self.tmp.chmod(plain_file_mode())
        self.tmp.replace(self.path)

    def abandon(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


class WebDatasetOutput(Output):
    """`<output>/<part>.tar`: the input's samples with the caption added."""

    name = "webdataset"

    def path(self, part: InputPart) -> Path:
        """A shard keeps its name (`00042.tar`, folders flattened with `_`); a run of files is named after its part."""
        name = part.shard.replace("/", "_") if part.shard is not None else f"{part.name}.tar"
        return self.folder / (name if name.endswith(".tar") else f"{name}.tar")

    def begin(self, part: InputPart, provenance: dict[str, Any]) -> PartOutput:
        return _Tar(self.path(part), provenance)


class _Sidecars(PartOutput):
    """A `.txt` per image, each written atomically as its batch finishes (the job's state says the part is done)."""

    def __init__(self, output: TxtOutput, part: InputPart) -> None:
        self.output, self.part = output, part

    def add(self, rows: list[dict[str, Any]], samples: list[Sample]) -> None:
        for row, sample in zip(rows, samples, strict=True):
            if row["caption"] is not None:
                with atomic_open(self.output.sidecar(self.part, sample)) as handle:
                    handle.write(caption_lines(row) + "\n")

    def finish(self) -> None:
        pass


class TxtOutput(Output):
    """A `.txt` beside each image: in the input tree (`--output` not given) or mirrored under `--output`."""

    name = "txt"

    def __init__(self, folder: Path | None, input_root: Path) -> None:
        super().__init__(folder or input_root)
        self.mirror = folder is not None

    @classmethod
    def create(cls, folder: str | None, input_root: Path) -> Output:
        return cls(Path(folder) if folder else None, input_root)

    def path(self, part: InputPart) -> Path:
        """The sidecars have no file of their part: the job's state (`parts/<part>.json`) is its record."""
        raise NotImplementedError

    def exists(self, part: InputPart) -> bool:
        return False

    def remove(self, part: InputPart) -> None:
        """Nothing: with `--overwrite` every image is captioned again and its `.txt` replaced as it is (removing them
        first would leave images without a caption if the run stopped)."""

    def sidecar(self, part: InputPart, sample: Sample) -> Path:
        relative = Path(sample.name)
        return (self.folder / relative if self.mirror else part.root / relative).with_suffix(".txt")

    def wanted(self, part: InputPart, sample: Sample, overwrite: bool) -> bool:
        return overwrite or not self.sidecar(part, sample).exists()

    def begin(self, part: InputPart, provenance: dict[str, Any]) -> PartOutput:
        if part.shard is not None:
            raise CaptionerError(
                "--format txt writes a .txt beside each image file; for images inside shards, "
                "use --format webdataset (new shards with the caption added), jsonl or parquet."
            )
        return _Sidecars(self, part)


OUTPUTS: dict[str, type[Output]] = {
    output.name: output for output in (TxtOutput, JsonlOutput, ParquetOutput, WebDatasetOutput)
}


def output_for(kind: str, folder: str | None, parts: list[InputPart]) -> Output:
    """The output a job writes (`OUTPUTS` by `--format`).

    Raises:
        CaptionerError: On an unknown format, or one that needs `--output`.
    """
    if kind not in OUTPUTS:
        raise CaptionerError(f"--format {kind!r}: choose one of {', '.join(OUTPUTS)}.")
    return OUTPUTS[kind].create(folder, parts[0].root)
