"""The LSTM caption decoder and its teacher-forced loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


AttentionState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


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
        """The LSTM's `(h0, c0)`, each `(num_layers, B, hidden_dim)`, from `(B, feature_dim)` features.

        Grid features `(B, regions, feature_dim)` are averaged first, which is the pooled feature.
        """
        if features.ndim == 3:
            features = features.mean(dim=1)
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
        out, _ = run_lstm(self.lstm, self.embed(tokens), self.init_state(features))
        return self.head(self.dropout(out))

    def step(self, tokens: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        """One decoding step: `(B,)` previous tokens -> `(B, vocab_size)` logits and the new state."""
        out, state = run_lstm(self.lstm, self.embed(tokens).unsqueeze(1), state)
        return self.head(out.squeeze(1)), state

    @staticmethod
    def expand_state(state: LSTMState, beams: int) -> LSTMState:
        """Repeat each image's state `beams` times (batch is dimension 1 of an LSTM state)."""
        return tuple(part.repeat_interleave(beams, dim=1) for part in state)

    @staticmethod
    def select_state(state: LSTMState, index: torch.Tensor) -> LSTMState:
        """Keep the states at `index` (the surviving beams)."""
        return tuple(part[:, index] for part in state)


class AttentionDecoder(nn.Module):
    """Show, Attend and Tell: an LSTM that attends over image regions at every word.

    At each step the previous hidden state scores every region (additive
    attention); the weights (softmax over regions, summing to one) average the
    regions into a context vector, scaled by a learned gate, that is fed with
    the word embedding into the LSTM cell. The initial state comes from the
    mean region, as in the paper.

    Args:
        vocab_size: Number of tokens, specials included.
        feature_dim: Size of each region's feature (2048 for ResNet50).
        embed_dim: Word embedding size.
        hidden_dim: LSTM state size.
        attention_dim: Size of the attention layer.
        dropout: Dropout before the output layer.
        pad_index: The padding token.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int = 2048,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.5,
        pad_index: int = 0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.feature_norm = nn.BatchNorm1d(feature_dim)  # per channel, over images and regions
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.attend_regions = nn.Linear(feature_dim, attention_dim)
        self.attend_hidden = nn.Linear(hidden_dim, attention_dim)
        self.attend_score = nn.Linear(attention_dim, 1)
        self.gate = nn.Linear(hidden_dim, feature_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_index)
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, features: torch.Tensor) -> AttentionState:
        """`(h, c, regions, projected regions)` from `(B, regions, feature_dim)` grid features."""
        if features.ndim != 3:
            raise ValueError("the attention decoder needs grid features (B, regions, dim): use --data.features grid")
        batch, regions, dim = features.shape
        regions_normed = self.feature_norm(features.reshape(-1, dim)).view(batch, regions, dim)
        mean = regions_normed.mean(dim=1)
        h, c = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))
        return h, c, regions_normed, self.attend_regions(regions_normed)

    def attend(self, state: AttentionState) -> tuple[torch.Tensor, torch.Tensor]:
        """The gated context vector `(B, feature_dim)` and the attention weights `(B, regions)`."""
        h, _, regions, projected = state
        scores = self.attend_score(torch.tanh(projected + self.attend_hidden(h).unsqueeze(1))).squeeze(-1)
        weights = torch.softmax(scores.float(), dim=-1).to(regions.dtype)
        context = (weights.unsqueeze(-1) * regions).sum(dim=1)
        return torch.sigmoid(self.gate(h)) * context, weights

    def step_with_attention(self, tokens: torch.Tensor, state: AttentionState):
        """One step: logits `(B, V)`, the new state and the attention weights used for this word."""
        h, c, regions, projected = state
        context, weights = self.attend(state)
        h, c = self.cell(torch.cat([self.embed(tokens), context], dim=-1), (h, c))
        return self.head(self.dropout(h)), (h, c, regions, projected), weights

    def step(self, tokens: torch.Tensor, state: AttentionState) -> tuple[torch.Tensor, AttentionState]:
        """One decoding step (the interface search uses)."""
        logits, state, _ = self.step_with_attention(tokens, state)
        return logits, state

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, return_attention: bool = False):
        """Teacher-forced logits `(B, T, V)` and, with `return_attention`, the weights `(B, T, regions)`."""
        state = self.init_state(features)
        logits, weights = [], []
        for t in range(tokens.shape[1]):
            step_logits, state, step_weights = self.step_with_attention(tokens[:, t], state)
            logits.append(step_logits)
            weights.append(step_weights)
        logits = torch.stack(logits, dim=1)
        return (logits, torch.stack(weights, dim=1)) if return_attention else logits

    @staticmethod
    def expand_state(state: AttentionState, beams: int) -> AttentionState:
        """Repeat each image's state `beams` times (batch is dimension 0 here)."""
        return tuple(part.repeat_interleave(beams, dim=0) for part in state)

    @staticmethod
    def select_state(state: AttentionState, index: torch.Tensor) -> AttentionState:
        """Keep the states at `index` (the surviving beams)."""
        return tuple(part[index] for part in state)


def doubly_stochastic_penalty(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Show, Attend and Tell's regulariser: every region should receive about one unit of attention per caption.

    Args:
        weights: `(B, T, regions)` attention weights.
        mask: `(B, T)` True where the step is a real token (padding steps do not count).

    Returns:
        The mean over captions of `sum_regions (1 - sum_t weights)^2`.
    """
    coverage = (weights * mask.unsqueeze(-1)).sum(dim=1)
    return ((1.0 - coverage) ** 2).sum(dim=-1).mean()


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad_index: int) -> torch.Tensor:
    """Mean cross-entropy over the non-padding target tokens.

    Args:
        logits: `(B, T, V)` decoder output.
        targets: `(B, T)` next tokens; `pad_index` positions do not count.
        pad_index: The padding token.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=pad_index)
