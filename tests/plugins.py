"""Parts defined outside the package, as a user would write them: a decoder, an encoder, and a callback for resume
tests.

Chosen in a config with `--model.decoder tests.plugins.GRUDecoder` (and `--model.decoder.hidden_dim 32`), or
`--model.encoder tests.plugins.TinyConvEncoder`.
"""

from __future__ import annotations

import json
import os
import signal
import time

import torch
from lightning.pytorch import Callback
from torch import nn

from captioner.encoders.base import GridUnavailableError, ImageEncoder
from captioner.encoders.preprocessing import Preprocessing
from captioner.models.decoders.base import CaptionDecoder, DecoderOutput


class TinyConvEncoder(ImageEncoder):
    """Three strided convolutions: a grid of (image_size / 8)^2 regions, or their mean.

    Args:
        width: Channels of every convolution (the feature size).
        image_size: Input side.
        pooled_only: Give no grid (as some encoders cannot), to test what a decoder that attends says then.
    """

    def __init__(self, width: int = 24, image_size: int = 32, pooled_only: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU()),
        )
        self.use_preprocessing(Preprocessing(image_size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))

    def encode(self, pixels: torch.Tensor, grid: bool) -> torch.Tensor:
        feature_map = self.stages(pixels)
        if grid:
            if self.hparams.pooled_only:
                raise GridUnavailableError("TinyConvEncoder(pooled_only=True) gives no grid")
            return feature_map.flatten(2).transpose(1, 2)
        return feature_map.mean(dim=(2, 3))

    def blocks(self) -> list[nn.Module]:
        return list(self.stages)


class GRUDecoder(CaptionDecoder):
    """A one-layer GRU whose first hidden state is the projected pooled image feature.

    Args:
        vocab_size: Number of tokens (from the vocabulary).
        feature_dim: Image feature size (from the encoder).
        hidden_dim: GRU state size.
        dropout: Dropout before the output layer.
    """

    features = "pooled"

    def __init__(self, vocab_size: int, feature_dim: int, hidden_dim: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.norm = nn.BatchNorm1d(feature_dim)
        self.image = nn.Linear(feature_dim, hidden_dim)
        self.embed = nn.Embedding(vocab_size, hidden_dim, padding_idx=0)
        self.gru = nn.GRU(hidden_dim, hidden_dim, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 3:
            features = features.mean(dim=1)
        return torch.tanh(self.image(self.norm(features)))

    def initial_state(self, context: torch.Tensor) -> torch.Tensor:
        return context

    def forward(self, features, tokens, return_attention=False, owners=None) -> DecoderOutput:
        context = self.prepare(features)
        if owners is not None:
            context = context[owners]
        out, _ = self.gru(self.embed(tokens), context.unsqueeze(0))
        return DecoderOutput(self.head(self.dropout(out)))

    def step(self, tokens: torch.Tensor, state: torch.Tensor, context: torch.Tensor):
        out, hidden = self.gru(self.embed(tokens).unsqueeze(1), state.unsqueeze(0))
        return self.head(out.squeeze(1)), hidden.squeeze(0)


class SignalAt(Callback):
    """Send this process a signal at a point of training, as a scheduler or a crash would (for resume tests).

    Args:
        signal_name: "SIGKILL" (nothing runs after it) or "SIGTERM" (Lightning's graceful stop).
        epoch_start: Send it when this epoch (0-based) starts, after everything of the one before was saved.
        step: Or send it after this global step.
        delay_s: Wait this long first (so that writers which flush on a timer, such as W&B's, have written).
        group: Signal the whole process group (every rank of a distributed run at once, as when a node dies; run
            the command in a session of its own).
    """

    def __init__(
        self,
        signal_name: str = "SIGKILL",
        epoch_start: int | None = None,
        step: int | None = None,
        delay_s: float = 0.0,
        group: bool = False,
    ) -> None:
        self.signum = getattr(signal, signal_name)
        self.epoch_start, self.step, self.delay_s, self.group = epoch_start, step, delay_s, group

    def _send(self) -> None:
        time.sleep(self.delay_s)
        if self.group:
            os.killpg(os.getpgrp(), self.signum)
        os.kill(os.getpid(), self.signum)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch_start:
            self._send()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self._send()


class SeenNames(Callback):
    """Record which images and captions each training batch held (`names`, as streamed batches carry them): one JSON
    line per batch, per rank, in `folder/rank<r>.jsonl`, with the epoch, the global step after it and the process."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        os.makedirs(self.folder, exist_ok=True)
        line = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "names": list(batch["names"]),
            "captions": pl_module.vocabulary.decode_batch(batch["tokens"]),
            "process": os.getpid(),
        }
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
