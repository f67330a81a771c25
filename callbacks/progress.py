"""Throughput in the progress bar and the logger, and a short summary when a run ends."""

from __future__ import annotations

import logging
import time

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger("captioner")


class Throughput(Callback):
    """Log training captions/s (`train/captions_per_s`, also in the progress bar).

    Measured as captions over wall time between batch ends, smoothed over the
    last `window` batches. No device synchronisation is added: on a GPU the
    queue of launched kernels is bounded, so the average settles on the true
    rate within a few batches.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._times: list[float] = []
        self._sizes: list[int] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._times, self._sizes = [time.perf_counter()], []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._times.append(time.perf_counter())
        self._sizes.append(len(batch[1]))
        self._times, self._sizes = self._times[-self.window - 1 :], self._sizes[-self.window :]
        elapsed = self._times[-1] - self._times[0]
        if elapsed > 0:
            pl_module.log("train/captions_per_s", sum(self._sizes) / elapsed, prog_bar=True, on_step=True)


class RunSummary(Callback):
    """Print where the results are when `fit` ends: best val BLEU-4, best checkpoint, sample pictures."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        lines = ["Run summary:"]
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_path:
            score = checkpoint.best_model_score
            lines.append(f"  best {checkpoint.monitor}: {float(score):.2f}" if score is not None else "")
            lines.append(f"  best checkpoint: {checkpoint.best_model_path}")
        from callbacks.samples import CaptionSamples

        for callback in trainer.callbacks:
            if isinstance(callback, CaptionSamples) and callback.last_grid is not None:
                lines.append(f"  sample captions: {callback.last_grid.parent}/")
        print("\n".join(line for line in lines if line))
