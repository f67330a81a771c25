"""The LSTM caption decoder and its teacher-forced loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LSTMState = tuple[torch.Tensor, torch.Tensor]


class CaptionDecoder(nn.Module):
    """An LSTM language model conditioned on one image feature vector.

    The projected image feature sets the LSTM's initial hidden and cell state
    (per layer) rather than being fed as a first input step: the image then
    conditions every layer from the first word on, the input sequence is
    exactly the caption tokens, and search can start from a state without a
    special first step. A BatchNorm on the feature standardises every
    dimension with statistics over training images: pooled CNN features share
    a large common component, and what tells images apart is the small
    per-dimension variation around it (for a random frozen backbone nearly
    all of it). Its running statistics are part of the checkpoint.

    Args:
        vocab_size: Number of tokens, specials included.
        feature_dim: Size of the image feature (2048 for ResNet50).
        embed_dim: Word embedding size.
        hidden_dim: LSTM state size.
        num_layers: Stacked LSTM layers.
        dropout: Dropout on the image feature, between LSTM layers and before the output layer.
        pad_index: The padding token, whose embedding stays zero.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int = 2048,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        num_layers: int = 1,
        dropout: float = 0.5,
        pad_index: int = 0,
    ) -> None:
        super().__init__()
        self.vocab_size, self.num_layers, self.hidden_dim = vocab_size, num_layers, hidden_dim
        self.feature_norm = nn.BatchNorm1d(feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.init_state_proj = nn.Linear(feature_dim, 2 * num_layers * hidden_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_index)
        self.lstm = nn.LSTM(
            embed_dim, hidden_dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.head = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, features: torch.Tensor) -> LSTMState:
        """The LSTM's `(h0, c0)`, each `(num_layers, B, hidden_dim)`, from `(B, feature_dim)` features."""
        projected = torch.tanh(self.init_state_proj(self.dropout(self.feature_norm(features))))
        h0, c0 = projected.view(features.shape[0], 2, self.num_layers, self.hidden_dim).permute(1, 2, 0, 3)
        return h0.contiguous(), c0.contiguous()

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            features: `(B, feature_dim)` image features.
            tokens: `(B, T)` input tokens, starting with `<start>`.

        Returns:
            `(B, T, vocab_size)` logits for the next token at every position.
        """
        out, _ = self.lstm(self.embed(tokens), self.init_state(features))
        return self.head(self.dropout(out))

    def step(self, tokens: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        """One decoding step: `(B,)` previous tokens -> `(B, vocab_size)` logits and the new state."""
        out, state = self.lstm(self.embed(tokens).unsqueeze(1), state)
        return self.head(out.squeeze(1)), state


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad_index: int) -> torch.Tensor:
    """Mean cross-entropy over the non-padding target tokens.

    Args:
        logits: `(B, T, V)` decoder output.
        targets: `(B, T)` next tokens; `pad_index` positions do not count.
        pad_index: The padding token.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=pad_index)
