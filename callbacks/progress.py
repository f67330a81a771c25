"""Throughput in the progress bar and the logger, and a short summary when a run ends."""

from __future__ import annotations

import logging
import time

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger("captioner")


class Throughput(Callback):
    """Rates in the progress bar: training captions/s (the images' reference captions; also logged as
    `train/captions_per_s`), predict images/s.

    Measured as items over wall time between batch ends, smoothed over the
    last `window` batches. No device synchronisation is added: on a GPU the
    queue of launched kernels is bounded, so the average settles on the true
    rate within a few batches.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._times: list[float] = []
        self._sizes: list[int] = []

    def _restart(self) -> None:
        self._times, self._sizes = [time.perf_counter()], []

    def _rate(self, items: int) -> float | None:
        self._times.append(time.perf_counter())
        self._sizes.append(items)
        self._times, self._sizes = self._times[-self.window - 1 :], self._sizes[-self.window :]
        elapsed = self._times[-1] - self._times[0]
        return sum(self._sizes) / elapsed if elapsed > 0 else None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restart()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        rate = self._rate(len(batch["tokens"]))  # every reference caption of the batch's images
        if rate is not None:
            pl_module.log("train/captions_per_s", rate, prog_bar=True, on_step=True)

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restart()

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        rate = self._rate(len(outputs))  # one row per image of the batch, read or not
        bar = getattr(trainer.progress_bar_callback, "predict_progress_bar", None)  # TQDMProgressBar's
        if rate is not None and bar is not None:
            bar.set_postfix({"images/s": f"{rate:.1f}"}, refresh=False)


class RunSummary(Callback):
    """Print where the results are when `fit` ends: the best monitored score (and the other validation scores of
    that epoch), the best checkpoint, the sample pictures and how long training took.

    Attributes:
        fit_seconds: Wall time of the last `fit`, data preparation left out.
    """

    def __init__(self) -> None:
        self.fit_seconds: float | None = None
        self._started = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.fit_seconds = time.perf_counter() - self._started
        if not trainer.is_global_zero:
            return
        lines = ["Run summary:"]
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_path:
            score = checkpoint.best_model_score
            lines.append(f"  best {checkpoint.monitor}: {float(score):.2f}" if score is not None else "")
            lines.append(f"  best checkpoint: {checkpoint.best_model_path}")
        from captioner.callbacks.samples import CaptionSamples

        for callback in trainer.callbacks:
            if isinstance(callback, CaptionSamples) and callback.last_grid is not None:
                lines.append(f"  sample captions: {callback.last_grid.parent}/")
        minutes, seconds = divmod(round(self.fit_seconds), 60)
        lines.append(f"  training took {minutes} min {seconds:02d} s ({trainer.current_epoch} epochs)")
        print("\n".join(line for line in lines if line))
