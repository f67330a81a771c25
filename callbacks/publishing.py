"""PublishedModel: with W&B's `log_model` on, the tested checkpoint published and linked to the run as an artifact."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from captioner.core.errors import CaptionerError
from captioner.runs import run_dir

log = logging.getLogger("captioner")


class PublishedModel(Callback):
    """After `test` of a checkpoint, when a `WandbLogger` has `log_model` on: the checkpoint published
    (`python -m captioner publish`: safetensors weights, config, tokenizer and the model card with the test's
    scores) into `<run>/published/<checkpoint name>/`, and that folder logged to the W&B run as a `model` artifact
    named `captioner-<run id>`, so the run links the very folder `Captioner.from_pretrained` loads.

    `python -m captioner` adds it to every run; without W&B's `log_model` it does nothing. Lightning's own
    `log_model` still uploads the checkpoints beside it.
    """

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = [
            logger
            for logger in trainer.loggers
            if isinstance(logger, WandbLogger) and getattr(logger, "_log_model", False)
        ]  # Lightning keeps the setting under this name
        if not trainer.is_global_zero or not loggers:
            return
        if not trainer.ckpt_path or not Path(trainer.ckpt_path).is_file():
            log.info("Not published to W&B: this test ran on a model without a checkpoint file.")
            return
        from captioner.publish import publish

        checkpoint = Path(trainer.ckpt_path)
        folder = run_dir(trainer)
        output = folder / "published" / checkpoint.stem
        if output.exists():  # a second test of the same checkpoint in this run: published anew
            shutil.rmtree(output)
        report = folder / "test_metrics.json"  # written by TestReport, which runs before this callback
        try:
            publish(checkpoint, output, test_metrics=report if report.is_file() else None)
        except CaptionerError as error:  # e.g. huggingface_hub missing: the run's results stand
            log.warning("Not published to W&B: %s", error)
            return
        import wandb

        for logger in loggers:
            run = logger.experiment
            artifact = wandb.Artifact(
                f"captioner-{run.id}",
                type="model",
                description=f"captioner published from {checkpoint.name}",
                metadata={"checkpoint": checkpoint.name},
            )
            artifact.add_dir(str(output))
            run.log_artifact(artifact, aliases=["latest", checkpoint.stem])
        log.info(
            "Published %s to %s and logged it to W&B as captioner-%s", checkpoint.name, output, loggers[0].experiment.id
        )
