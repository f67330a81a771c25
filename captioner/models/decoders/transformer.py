"""A Transformer decoder over image regions, with a key/value cache for step-by-step decoding."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from captioner.models.decoders.base import CaptionDecoder, DecoderOutput, rows_per_context


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """The fixed sine/cosine position codes of "Attention Is All You Need", `(length, width)`."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    codes = torch.zeros(length, width)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return codes


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value projections, so keys and values can be cached."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, T, W)` -> `(B, heads, T, W / heads)`."""
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(B, heads, T, W / heads)` of `x`."""
        keys, values = self.key_value(x).chunk(2, dim=-1)
        return self.split(keys), self.split(values)

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        causal: bool = False,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from `x` `(B, T, W)` to the keys and values; the weights `(B, T, S)` (mean over heads) on request."""
        query = self.split(self.query(x))
        if return_weights:
            scores = query @ keys.transpose(-2, -1) / math.sqrt(query.shape[-1])
            if causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            weights = torch.softmax(scores.float(), dim=-1).to(values.dtype)
            mixed = F.dropout(weights, self.dropout, self.training) @ values
        else:
            weights = None
            mixed = F.scaled_dot_product_attention(
                query, keys, values, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
            )
        out = self.out(mixed.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return out, None if weights is None else weights.mean(dim=1)


class Block(nn.Module):
    """Pre-norm decoder block: masked self-attention, cross-attention over the regions, feed-forward."""

    def __init__(self, width: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ffn = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attention = Attention(width, heads, dropout)
        self.cross_attention = Attention(width, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, width))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        cross_keys: torch.Tensor,
        cross_values: torch.Tensor,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """One block over `x` `(rows, T, W)`.

        Without `past` (teacher forcing) the words attend causally to each
        other; with `past` (the cached keys and values of earlier positions)
        the new positions attend to those and to themselves. When the cross
        keys have fewer rows than `x` (one per image, several beams per image),
        each image's beams attend to its regions as one group of queries, so the
        regions' keys and values are read once per image.

        Returns:
            The output, the cross-attention weights (on request) and this block's self-attention keys and values
            (to cache).
        """
        normed = self.norm_self(x)
        keys, values = self.self_attention.keys_values(normed)
        if past is not None:
            keys, values = torch.cat([past[0], keys], dim=2), torch.cat([past[1], values], dim=2)
        attended, _ = self.self_attention(normed, keys, values, causal=past is None)
        x = x + self.dropout(attended)
        rows, length, width = x.shape
        images = cross_keys.shape[0]
        queries = self.norm_cross(x).reshape(images, rows_per_context(rows, images) * length, width)
        attended, weights = self.cross_attention(queries, cross_keys, cross_values, return_weights=return_weights)
        x = x + self.dropout(attended.reshape(rows, length, width))
        weights = weights.reshape(rows, length, -1) if weights is not None else None
        return x + self.dropout(self.ffn(self.norm_ffn(x))), weights, (keys, values)


class TransformerDecoder(CaptionDecoder):
    """Masked self-attention over the words, cross-attention over the image regions, pre-norm blocks.

    The regions (the grid of the encoder's last convolutional map; a pooled
    vector is one region) are standardised per channel (a BatchNorm, as in the
    other decoders: what tells images apart is the small variation around the
    features' common component), projected to the model width and given a
    learned embedding of their place in the grid, since attention alone does
    not know where a region is.

    Step-by-step decoding keeps every layer's self-attention keys and values
    (the state) and computes each layer's cross-attention keys and values once
    per image (the context), so a step costs one new position, not the whole
    prefix again. The last layer's cross-attention weights (mean over heads)
    are what the attention pictures show.

    Args:
        vocab_size: Number of tokens, specials included (from the vocabulary).
        feature_dim: Size of each region's feature (from the encoder).
        width: Model width (d_model).
        layers: Decoder blocks.
        heads: Attention heads (must divide `width`).
        ffn_dim: Feed-forward hidden size (None: 4 x width).
        dropout: Dropout on attention weights, sublayer outputs and embeddings.
        positions: "learned" or "sinusoidal" word position codes.
        max_length: Most tokens a caption may have (`<start>` included) for the position table.
        max_regions: Most image regions (a 14 x 14 grid by default).
    """

    features = "grid"

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        width: int = 512,
        layers: int = 3,
        heads: int = 8,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        positions: Literal["learned", "sinusoidal"] = "learned",
        max_length: int = 64,
        max_regions: int = 196,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.feature_norm = nn.BatchNorm1d(feature_dim)
        self.project_regions = nn.Linear(feature_dim, width)
        self.region_positions = nn.Embedding(max_regions, width)
        self.embed = nn.Embedding(vocab_size, width, padding_idx=0)
        if positions == "learned":
            self.word_positions = nn.Parameter(torch.randn(max_length, width) * 0.02)
        else:
            self.register_buffer("word_positions", sinusoidal_positions(max_length, width), persistent=False)
        self.blocks = nn.ModuleList(Block(width, heads, ffn_dim or 4 * width, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, vocab_size)

    def longest_caption(self) -> int:
        """The position table holds `<start>` and the words fed back: `max_length - 1` words, then `<end>`."""
        return self.hparams.max_length - 1

    # ------------------------------------------------------------ shared pieces
    def _memory(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 2:
            features = features.unsqueeze(1)
        batch, regions, dim = features.shape
        if regions > self.hparams.max_regions:
            raise ValueError(f"{regions} image regions, more than max_regions={self.hparams.max_regions}")
        normed = self.feature_norm(features.reshape(-1, dim)).view(batch, regions, dim)
        places = self.region_positions(torch.arange(regions, device=features.device))
        return self.dropout(self.project_regions(normed) + places)

    def _words(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        if start + tokens.shape[1] > self.hparams.max_length:
            raise ValueError(f"captions longer than max_length={self.hparams.max_length} tokens")
        return self.dropout(self.embed(tokens) + self.word_positions[start : start + tokens.shape[1]])

    # ------------------------------------------------------------ teacher forcing
    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        return_attention: bool = False,
        owners: torch.Tensor | None = None,
    ) -> DecoderOutput:
        memory, x, weights = self._memory(features), self._words(tokens, 0), None
        for index, block in enumerate(self.blocks):
            cross_keys, cross_values = block.cross_attention.keys_values(memory)  # once per image
            if owners is not None:
                cross_keys, cross_values = cross_keys[owners], cross_values[owners]
            last = return_attention and index == len(self.blocks) - 1
            x, weights, _ = block(x, None, cross_keys, cross_values, return_weights=last)
        return DecoderOutput(self.head(self.norm(x)), weights)

    # ------------------------------------------------------------ step by step
    def prepare(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every layer's cross-attention keys and values, `(B, heads, regions, width / heads)` each, in order."""
        memory = self._memory(features)
        return tuple(part for block in self.blocks for part in block.cross_attention.keys_values(memory))

    def expand_context(self, context: tuple[torch.Tensor, ...], beams: int) -> tuple[torch.Tensor, ...]:
        return context  # one row per image: the blocks let it serve the image's beams

    def initial_state(self, context: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Empty self-attention caches (keys and values per layer, 0 positions long)."""
        empty = context[0][:, :, :0]
        return tuple(empty for _ in range(2 * len(self.blocks)))

    def step(self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...], context: tuple[torch.Tensor, ...]):
        x = self._words(tokens.unsqueeze(1), start=state[0].shape[2])
        new_state = []
        for index, block in enumerate(self.blocks):
            past = (state[2 * index], state[2 * index + 1])
            x, _, cache = block(x, past, context[2 * index], context[2 * index + 1])
            new_state += cache
        return self.head(self.norm(x)).squeeze(1), tuple(new_state)
