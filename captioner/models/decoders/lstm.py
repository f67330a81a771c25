"""The pooled-feature LSTM decoder: the image sets the LSTM's initial state."""

from __future__ import annotations

import torch
from torch import nn

from captioner.models.decoders.base import CaptionDecoder, DecoderOutput

LSTMState = tuple[torch.Tensor, torch.Tensor]

# Device types whose autocast runs cuDNN RNNs in float16 whatever dtype it was asked for (torch's autocast
# rule for `lstm` on CUDA casts weights, inputs and states to half). bf16-mixed has no gradient scaler, so
# small LSTM gradients would underflow float16: there the LSTM runs in float32 instead.
RNN_AUTOCAST_FORCES_HALF = {"cuda"}


def run_lstm(lstm: nn.LSTM, inputs: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
    """`lstm(inputs, state)` in float32 where autocast would force it to float16; as autocast says elsewhere.

    On CPUs autocast runs the LSTM in bf16 for real (oneDNN), which is kept.
    """
    device_type = inputs.device.type
    if device_type in RNN_AUTOCAST_FORCES_HALF and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return lstm(inputs.float(), tuple(part.float() for part in state))
    return lstm(inputs, state)


class LSTMDecoder(CaptionDecoder):
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

    Grid features `(B, regions, D)` are averaged first, which is the pooled feature.

    Args:
        vocab_size: Number of tokens, specials included (from the vocabulary).
        feature_dim: Size of the image feature (from the encoder: 2048 for ResNet50).
        embed_dim: Word embedding size.
        hidden_dim: LSTM state size.
        num_layers: Stacked LSTM layers.
        dropout: Dropout on the image feature, between LSTM layers and before the output layer.
    """

    features = "pooled"

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        num_layers: int = 1,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_layers, self.hidden_dim = num_layers, hidden_dim
        self.feature_norm = nn.BatchNorm1d(feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.init_state_proj = nn.Linear(feature_dim, 2 * num_layers * hidden_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(
            embed_dim, hidden_dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.head = nn.Linear(hidden_dim, vocab_size)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """The (standardised, projected) image is all the LSTM needs; nothing stays constant per image."""
        if features.ndim == 3:
            features = features.mean(dim=1)
        return torch.tanh(self.init_state_proj(self.dropout(self.feature_norm(features))))

    def expand_context(self, context: torch.Tensor, beams: int) -> torch.Tensor:
        return context  # `step` never reads it: the image lives in the state

    def initial_state(self, context: torch.Tensor) -> LSTMState:
        """`(h0, c0)`, each `(B, num_layers, hidden_dim)` (batch first, as the protocol wants)."""
        h0, c0 = context.view(context.shape[0], 2, self.num_layers, self.hidden_dim).unbind(dim=1)
        return h0, c0

    def _run(self, embedded: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        h, c = (part.transpose(0, 1).contiguous() for part in state)  # nn.LSTM wants (layers, B, H)
        out, (h, c) = run_lstm(self.lstm, embedded, (h, c))
        return out, (h.transpose(0, 1), c.transpose(0, 1))

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        return_attention: bool = False,
        owners: torch.Tensor | None = None,
    ) -> DecoderOutput:
        context = self.prepare(features)
        if owners is not None:
            context = context[owners]
        out, _ = self._run(self.embed(tokens), self.initial_state(context))
        return DecoderOutput(self.head(self.dropout(out)))

    def step(self, tokens: torch.Tensor, state: LSTMState, context: torch.Tensor) -> tuple[torch.Tensor, LSTMState]:
        out, state = self._run(self.embed(tokens).unsqueeze(1), state)
        return self.head(out.squeeze(1)), state
