"""CaptionSamples: the same validation images with generated and reference captions, every epoch."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from captioner.core.files import atomic_open
from captioner.models import captioning
from captioner.render import captioned_image, image_grid
from captioner.runs import run_dir

log = logging.getLogger("captioner")


class CaptionSamples(Callback):
    """After each validation epoch, caption a fixed set of validation images and show them.

    Always writes a PNG grid to `<run folder>/samples/epoch_NNN.png` (the image,
    the generated caption in black, the references in grey); with a W&B
    logger, also logs a table `val/samples` (image, generated, references, epoch).

    Args:
        num_images: How many validation images (the first ones of the split, so the same every epoch).
        columns: Grid columns.
        tile_width: Width of each picture in pixels.
        references: How many reference captions to print under each picture.
    """

    def __init__(self, num_images: int = 8, columns: int = 4, tile_width: int = 320, references: int = 2) -> None:
        self.num_images, self.columns, self.tile_width, self.references = num_images, columns, tile_width, references
        self.last_grid: Path | None = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.num_images <= 0:
            return
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "datasets", {}).get("val")
        if dataset is None:
            return
        count = min(self.num_images, len(dataset))
        batch = datamodule.materialize(dataset.__getitems__(list(range(count))))
        with torch.no_grad():
            features = pl_module.batch_features(batch).to(pl_module.device)  # cached, or from the images
            greedy = pl_module.decoding.greedy()
            tokens = captioning.decode_features(pl_module, features, greedy).best_tokens
        generated = pl_module.vocabulary.decode_batch(tokens)
        epoch = trainer.current_epoch
        tiles, rows = [], []
        for name, caption, refs in zip(batch["file_names"], generated, batch["references"]):
            image = datamodule.sample_image(name)
            tiles.append(captioned_image(image, [caption, *refs[: self.references]], self.tile_width))
            rows.append((image, caption, refs))
        path = run_dir(trainer) / "samples" / f"epoch_{epoch:03d}.png"
        with atomic_open(path, "wb") as handle:
            image_grid(tiles, self.columns).save(handle, format="PNG")
        self.last_grid = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.log_table(
                    key="val/samples",
                    columns=["image", "generated", "references", "epoch"],
                    data=[[wandb.Image(image), caption, "\n".join(refs), epoch] for image, caption, refs in rows],
                    step=trainer.global_step,
                )
