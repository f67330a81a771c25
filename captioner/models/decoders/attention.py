"""Show, Attend and Tell: an LSTM that attends over image regions at every word."""

from __future__ import annotations

import torch
from torch import nn

from captioner.models.decoders.base import CaptionDecoder, DecoderOutput, rows_per_context

AttentionState = tuple[torch.Tensor, torch.Tensor]  # h, c: (B, hidden_dim) each
AttentionContext = tuple[torch.Tensor, torch.Tensor]  # regions (B, R, D), projected regions (B, R, A)


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


class AttentionDecoder(CaptionDecoder):
    """Show, Attend and Tell (Xu et al. 2015), soft attention with a gate.

    At each step the previous hidden state scores every region (additive
    attention); the weights (softmax over regions, summing to one) average the
    regions into a context vector, scaled by a learned gate, that is fed with
    the word embedding into the LSTM cell. The initial state comes from the
    mean region, as in the paper. Training adds the paper's doubly stochastic
    penalty, weighted by `regularization`.

    Args:
        vocab_size: Number of tokens, specials included (from the vocabulary).
        feature_dim: Size of each region's feature (from the encoder: 2048 for ResNet50).
        embed_dim: Word embedding size.
        hidden_dim: LSTM state size.
        attention_dim: Size of the attention layer.
        dropout: Dropout before the output layer.
        regularization: Weight of the doubly stochastic attention penalty.
    """

    features = "grid"
    training_only_options = ("dropout", "regularization")

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.5,
        regularization: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.feature_norm = nn.BatchNorm1d(feature_dim)  # per channel, over images and regions
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.attend_regions = nn.Linear(feature_dim, attention_dim)
        self.attend_hidden = nn.Linear(hidden_dim, attention_dim)
        self.attend_score = nn.Linear(attention_dim, 1)
        self.gate = nn.Linear(hidden_dim, feature_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def prepare(self, features: torch.Tensor) -> AttentionContext:
        """Standardised regions and their projection into the attention space (pooled features: one region)."""
        if features.ndim == 2:
            features = features.unsqueeze(1)
        batch, regions, dim = features.shape
        normed = self.feature_norm(features.reshape(-1, dim)).view(batch, regions, dim)
        return normed, self.attend_regions(normed)

    def initial_state(self, context: AttentionContext) -> AttentionState:
        mean = context[0].mean(dim=1)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def expand_context(self, context: AttentionContext, beams: int) -> AttentionContext:
        return context  # one row per image; `_step` lets it serve the image's beams

    def _step(self, tokens: torch.Tensor, state: AttentionState, context: AttentionContext):
        """One word; each context row serves `rows // images` consecutive state rows (beams of one image)."""
        (h, c), (regions, projected) = state, context
        images, group = regions.shape[0], rows_per_context(h.shape[0], regions.shape[0])
        hidden = self.attend_hidden(h).view(images, group, 1, -1)
        scores = self.attend_score(torch.tanh(projected.unsqueeze(1) + hidden)).squeeze(-1)  # (images, group, R)
        weights = torch.softmax(scores.float(), dim=-1).to(regions.dtype)
        looked = torch.bmm(weights, regions).view(h.shape[0], -1)  # each image's regions read once, for all beams
        attended = torch.sigmoid(self.gate(h)) * looked
        h, c = self.cell(torch.cat([self.embed(tokens), attended.to(h.dtype)], dim=-1), (h, c))
        return self.head(self.dropout(h)), (h, c), weights.view(h.shape[0], -1)

    def step(self, tokens: torch.Tensor, state: AttentionState, context: AttentionContext):
        logits, state, _ = self._step(tokens, state, context)
        return logits, state

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        return_attention: bool = False,
        owners: torch.Tensor | None = None,
    ) -> DecoderOutput:
        context = self.prepare(features)
        if owners is not None:
            context = tuple(part[owners] for part in context)
        state, logits, weights = self.initial_state(context), [], []
        for t in range(tokens.shape[1]):
            step_logits, state, step_weights = self._step(tokens[:, t], state, context)
            logits.append(step_logits)
            weights.append(step_weights)
        return DecoderOutput(torch.stack(logits, dim=1), torch.stack(weights, dim=1))

    def regularization(self, output: DecoderOutput, mask: torch.Tensor) -> torch.Tensor:
        return self.hparams.regularization * doubly_stochastic_penalty(output.attention, mask)
