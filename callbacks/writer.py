"""CaptionWriter: predictions to JSONL and CSV, and optionally captioned copies of the images."""

from __future__ import annotations

import csv
import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from captioner.core.files import atomic_open
from captioner.core.pixels import open_accepted
from captioner.decoding.answers import ROW_FIELDS, Prediction
from captioner.render import attention_figure, captioned_image
from captioner.runs import run_dir

log = logging.getLogger("captioner")

# The CSV's columns: every row field but the alternatives (a list; predictions.jsonl holds them).
CSV_FIELDS = tuple(name for name in ROW_FIELDS if name != "alternatives")


class CaptionWriter(BasePredictionWriter):
    """Write every prediction once: `predictions.jsonl` (rows of `captioner.decoding.answers.ROW_FIELDS`),
    `predictions.csv` (the same without the alternatives) and, on request, pictures.

    Each process appends its rows to its own part file as batches finish;
    at the end, the first process merges the parts (sorted by path, each path
    once) into the final files, written atomically, and prints
    `N captioned, M failed`.

    Args:
        output_dir: Where to write (default: the run's folder).
        write_images: Also save each image with its caption set under it, as
            PNG files under `captioned/`, mirroring the input folder's tree.
        image_width: Width of the captioned pictures in pixels.
        attention_maps: With the attention decoder, also save for each image a
            picture of the region it attended to for each word, under `attention/`.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        write_images: bool = False,
        image_width: int = 512,
        attention_maps: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.write_images, self.image_width = output_dir, write_images, image_width
        self.attention_maps = attention_maps
        self._folder: Path | None = None
        self._part: Any = None

    def _part_path(self, rank: int) -> Path:
        return self._folder / f".predictions.{self._token}.rank{rank}.part"

    def _resolve_folder(self, trainer: Trainer) -> Path:
        return Path(self.output_dir) if self.output_dir else run_dir(trainer)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # One token per run, shared by all ranks, so two writers or two runs never share part files.
        folder, self._token = trainer.strategy.broadcast((str(self._resolve_folder(trainer)), uuid.uuid4().hex[:12]))
        self._folder = Path(folder)
        self._folder.mkdir(parents=True, exist_ok=True)
        self._part = self._part_path(trainer.global_rank).open("w", encoding="utf-8")
        datamodule = trainer.datamodule
        self._root = Path(datamodule.hparams.predict_dir) if datamodule is not None else None
        if self.attention_maps:
            pl_module.predict_attention = True  # rows then carry where each word looked, which this draws

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: list[Prediction],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        for answer in prediction:
            row = answer.row()
            self._part.write(json.dumps(row, ensure_ascii=False) + "\n")
            if self.write_images and row["caption"] is not None:
                self._write_picture(row, "captioned", captioned_image, [row["caption"]], self.image_width)
            if self.attention_maps and answer.attention is not None:
                words = [*row["caption"].split(), "<end>"][: len(answer.attention)]
                self._write_picture(row, "attention", attention_figure, words, answer.attention)
        self._part.flush()

    def _picture_path(self, source: Path, folder: str) -> Path:
        try:
            relative = source.relative_to(self._root) if self._root is not None else Path(source.name)
        except ValueError:
            relative = Path(source.name)
        return self._folder / folder / relative.with_suffix(relative.suffix + ".png")

    def _write_picture(self, row: dict, folder: str, draw, *args) -> None:
        """Draw `draw(image, *args)` for the row's image into `folder`, mirroring the input tree."""
        source = Path(row["image"])
        try:
            with open_accepted(source) as image:
                image.seek(0)
                picture = draw(image, *args)
        except OSError as error:  # it was readable a moment ago; report, do not stop
            log.warning("Could not draw the %s picture of %s: %s", folder, source, error)
            return
        target = self._picture_path(source, folder)
        with atomic_open(target, "wb") as handle:
            picture.save(handle, format="PNG")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._part.close()
        trainer.strategy.barrier("caption_writer_merge")
        if trainer.is_global_zero:
            self._merge(trainer.world_size)
        trainer.strategy.barrier("caption_writer_done")

    def _merge(self, world_size: int) -> None:
        rows: dict[str, dict] = {}
        for rank in range(world_size):
            part = self._part_path(rank)
            for line in part.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                rows.setdefault(row["image"], row)
            part.unlink()
        ordered = [rows[path] for path in sorted(rows)]
        with atomic_open(self._folder / "predictions.jsonl", "w") as handle:
            for row in ordered:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        with atomic_open(self._folder / "predictions.csv", "w") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(ordered)
        failed = sum(row["error"] is not None for row in ordered)
        log.info(
            "Predictions written to %s (predictions.jsonl, predictions.csv%s)",
            self._folder,
            (", captioned/" if self.write_images else "") + (", attention/" if self.attention_maps else ""),
        )
        print(f"{len(ordered) - failed} captioned, {failed} failed")
