"""How a CaptionModel learns: AdamW over the decoder (and the encoder blocks that train, more gently), with a
linear warm-up and a cosine or constant schedule, stepped every optimizer step."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from captioner.models.decoders.base import CaptionDecoder


def optimizer_and_schedule(
    decoder: CaptionDecoder,
    encoder_parameters: list[nn.Parameter],
    lr: float,
    encoder_lr: float | None,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    schedule: Literal["cosine", "constant"],
    clipping: bool,
) -> dict:
    """What `LightningModule.configure_optimizers` returns.

    Args:
        decoder: Its `parameter_groups(lr)`: its trainable parameters at `lr` unless it says otherwise.
        encoder_parameters: The trained encoder blocks' parameters, at `encoder_lr` (None: `lr` / 10).
        lr, weight_decay: AdamW's.
        warmup_steps: Steps of linear warm-up (at most half the run).
        total_steps: The run's optimizer steps (the cosine reaches zero there).
        schedule: "cosine" (decay to zero over the run) or "constant" (warm-up only).
        clipping: Gradients are clipped: a fused AdamW unscales gradients inside its step, so Lightning's
            mixed-precision plugins refuse to clip for it; the foreach kernels are nearly as fast.
    """
    groups = decoder.parameter_groups(lr)
    if encoder_parameters:  # a fine-tuned encoder learns more gently than the decoder it feeds
        groups.append({"params": encoder_parameters, "lr": encoder_lr or lr / 10})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=not clipping)
    total = max(1, total_steps)
    warmup = min(warmup_steps, total // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def configured_optimizers(model: Any) -> dict:
    """`optimizer_and_schedule` for a `CaptionModel` in its run: its decoder and trained encoder blocks, its
    learning-rate settings, the run's steps and whether it clips gradients."""
    hp, trainer = model.hparams, model.trainer
    return optimizer_and_schedule(
        model.require_decoder(),
        model.encoder.trainable_parameters(),
        hp.lr,
        hp.encoder_lr,
        hp.weight_decay,
        hp.warmup_steps,
        int(trainer.estimated_stepping_batches),
        hp.lr_schedule,
        clipping=bool(trainer.gradient_clip_val),
    )
