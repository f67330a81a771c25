"""Parts defined outside the package, as a user would write them: a decoder, and a callback for resume tests.

Chosen in a config with `--model.decoder tests.plugins.GRUDecoder` (and `--model.decoder.hidden_dim 32`).
"""

from __future__ import annotations

import os
import signal
import time

import torch
from lightning.pytorch import Callback
from torch import nn

from captioner.models.decoders.base import CaptionDecoder, DecoderOutput


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
    """

    def __init__(self, signal_name: str = "SIGKILL", epoch_start: int | None = None, step: int | None = None,
                 delay_s: float = 0.0) -> None:  # fmt: skip
        self.signum = getattr(signal, signal_name)
        self.epoch_start, self.step, self.delay_s = epoch_start, step, delay_s

    def _send(self) -> None:
        time.sleep(self.delay_s)
        os.kill(os.getpid(), self.signum)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch_start:
            self._send()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self._send()
