"""Prefix captioning over a causal language model (ClipCap, Mokady et al. 2021): image features mapped by a small
network to a prefix of embeddings that a Hugging Face causal LM (GPT-2 by default) continues with the caption.
`pip install 'captioner[hf]'`; the tokenizer is the LM's (`--data.tokenizer captioner.text.Pretrained`)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from captioner.core.errors import CaptionerError
from captioner.core.hub import hub_error, transformers_config
from captioner.core.parts import require_library, seeded_initialisation
from captioner.models.decoders.base import CaptionDecoder, DecoderOutput
from captioner.models.decoders.lora import ADAPTER_MARK, LoraSettings, add_adapters, into_adapted, merged_adapters

# Tokens a tokenizer may add to a pretrained LM's own (captioner.text.Pretrained adds <pad> and <start>).
MOST_ADDED_TOKENS = 16


class MlpMapper(nn.Module):
    """ClipCap's MLP: one pooled feature vector to `prefix_length` embeddings (a tanh hidden layer of half the
    output's size)."""

    def __init__(self, feature_dim: int, width: int, prefix_length: int, dropout: float) -> None:
        super().__init__()
        self.prefix_length = prefix_length
        hidden = width * prefix_length // 2
        self.net = nn.Sequential(
            nn.Linear(feature_dim, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, width * prefix_length)
        )

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        if regions.shape[1] != 1:
            raise CaptionerError(
                "The MLP mapper reads one pooled feature vector per image; use mapper: transformer for grid features."
            )
        return self.net(regions[:, 0]).view(regions.shape[0], self.prefix_length, -1)


class TransformerMapper(nn.Module):
    """ClipCap's Transformer mapper: the image as tokens (a pooled vector projected to `feature_tokens` tokens, or
    every grid region projected, with its place in the grid) beside `prefix_length` learned queries; a pre-norm
    Transformer encoder over both, whose outputs at the queries are the prefix."""

    def __init__(
        self,
        feature_dim: int,
        width: int,
        prefix_length: int,
        layers: int,
        heads: int,
        feature_tokens: int,
        max_regions: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.prefix_length, self.feature_tokens = prefix_length, feature_tokens
        self.pooled_tokens = nn.Linear(feature_dim, feature_tokens * width)
        self.region_tokens = nn.Linear(feature_dim, width)
        self.region_positions = nn.Embedding(max_regions, width)
        self.queries = nn.Parameter(torch.randn(prefix_length, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout, activation="relu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        batch, count, _ = regions.shape
        if count == 1:  # pooled: one vector becomes several tokens, as ClipCap's "clip length"
            tokens = self.pooled_tokens(regions[:, 0]).view(batch, self.feature_tokens, -1)
        else:
            if count > self.region_positions.num_embeddings:
                raise CaptionerError(
                    f"{count} image regions, more than the mapper's max_regions "
                    f"({self.region_positions.num_embeddings})."
                )
            places = self.region_positions(torch.arange(count, device=regions.device))
            tokens = self.region_tokens(regions) + places
        queries = self.queries.unsqueeze(0).expand(batch, -1, -1).to(tokens.dtype)
        return self.encoder(torch.cat([tokens, queries], dim=1))[:, -self.prefix_length :]


class PrefixLMDecoder(CaptionDecoder):
    """A causal language model continuing a prefix computed from the image (ClipCap).

    The features (standardised per channel, as in the other decoders) are
    mapped to `prefix_length` vectors in the LM's embedding space; the LM reads
    them, then the caption. The prefix's last vector takes the place of the
    start token, so the LM's first prediction after the prefix is the first
    word. Step-by-step decoding keeps the LM's key/value cache (every layer's
    keys and values, `(rows, heads, positions, head_dim)`) as the state and the
    prefix as the context: a step runs the LM on one new token. The ONNX export
    carries the cache as state, like the Transformer decoder's.

    The tokenizer must be the LM's when its weights are pretrained
    (`captioner.text.Pretrained` with the same id: its ids are the LM's, with
    `<pad>` and `<start>` added, whose embeddings are never read). A randomly
    initialised LM (`pretrained: false`, or `lm_config` without `lm`) takes any
    tokenizer, such as a BPE trained on the captions.

    Works with the decoder-only LMs whose cache is one key and one value tensor
    per layer (GPT-2, OPT, GPT-Neo, Pythia, Llama, Qwen2 and the like), not
    with sliding-window, recurrent or encoder-decoder models.

    Args:
        vocab_size: Number of tokens (from the tokenizer).
        feature_dim: Size of the image features (from the encoder).
        lm: A hub id (gpt2, distilgpt2, facebook/opt-125m, ...) or a local folder of an `AutoModelForCausalLM`.
            Its config is read once (from the hub's cache when offline) and recorded in checkpoints.
        lm_config: The LM's config as a dict with its `model_type` (instead of reading it by id); a randomly
            initialised LM of that shape when `lm` is null (the demo's small GPT-2).
        pretrained: Load `lm`'s weights at the start of training (false: random weights, seeded).
        train_lm: true trains the LM too (ClipCap's MLP variant); false keeps it frozen and in eval mode (ClipCap's
            Transformer variant, the better-scoring one), and only the mapper learns; "lora" freezes it and trains
            LoRA adapters on it (`pip install 'captioner[lora]'`; see `captioner.models.decoders.lora`).
        lm_lr: The LM's (or its adapters') learning rate when it trains (null: the model's lr).
        lora_rank, lora_alpha, lora_dropout: The adapters' rank, scale numerator (updates scaled by alpha / rank)
            and dropout, under `train_lm: lora`.
        lora_targets: The modules adapted (null: peft's default for the LM's type, its attention projections).
        prefix_length: Vectors in the prefix.
        mapper: "mlp" (pooled features) or "transformer" (pooled or grid).
        mapper_layers, mapper_heads: The Transformer mapper's depth and heads (the heads divide the LM's width).
        feature_tokens: Tokens a pooled vector becomes in the Transformer mapper.
        max_regions: The most grid regions the Transformer mapper places.
        dropout: Dropout in the mapper.
    """

    features = "pooled"
    training_only_options = ("dropout", "train_lm", "lm_lr", "pretrained")

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        lm: str | None = "gpt2",
        lm_config: dict[str, Any] | None = None,
        pretrained: bool = True,
        train_lm: bool | Literal["lora"] = False,
        lm_lr: float | None = None,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_targets: list[str] | None = None,
        prefix_length: int = 10,
        mapper: Literal["mlp", "transformer"] = "mlp",
        mapper_layers: int = 8,
        mapper_heads: int = 8,
        feature_tokens: int = 10,
        max_regions: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        transformers = require_library("transformers", "hf", type(self).__name__)
        if lm is None and lm_config is None:
            raise CaptionerError(f"{type(self).__name__} needs an lm (a hub id such as gpt2) or an lm_config.")
        if train_lm not in (True, False, "lora"):
            raise CaptionerError(f"train_lm must be true, false or lora, got {train_lm!r}.")
        if prefix_length < 1 or feature_tokens < 1:
            raise CaptionerError("prefix_length and feature_tokens must be at least 1.")
        if lm_config is None:
            try:
                lm_config = transformers.AutoConfig.from_pretrained(lm).to_dict()
            except Exception as error:  # an unknown id and an offline machine both end here
                raise hub_error(str(lm), error) from error
        # Record what was read from the hub: a checkpoint then rebuilds this decoder without the network.
        self.save_hyperparameters(
            {
                "lm": lm,
                "lm_config": lm_config,
                "pretrained": pretrained,
                "train_lm": train_lm,
                "lm_lr": lm_lr,
                "lora_rank": lora_rank,
                "lora_alpha": lora_alpha,
                "lora_dropout": lora_dropout,
                "lora_targets": lora_targets,
                "prefix_length": prefix_length,
                "mapper": mapper,
                "mapper_layers": mapper_layers,
                "mapper_heads": mapper_heads,
                "feature_tokens": feature_tokens,
                "max_regions": max_regions,
                "dropout": dropout,
            }
        )
        self.hparams.update(vocab_size=vocab_size, feature_dim=feature_dim)
        config = transformers_config(
            transformers, lm_config, "PrefixLMDecoder lm", "gpt2, opt, gpt_neo, gpt_neox, llama, qwen2"
        )
        self._check_vocabulary(config, vocab_size)
        with seeded_initialisation():
            self.lm = transformers.AutoModelForCausalLM.from_config(config)
            self._resize(self.lm, vocab_size)
        width = self.lm.get_input_embeddings().embedding_dim
        self.feature_norm = nn.BatchNorm1d(feature_dim)
        if mapper == "mlp":
            self.mapper: nn.Module = MlpMapper(feature_dim, width, prefix_length, dropout)
        elif mapper == "transformer":
            if width % mapper_heads:
                raise CaptionerError(f"mapper_heads {mapper_heads} must divide the LM's width {width}.")
            self.mapper = TransformerMapper(
                feature_dim, width, prefix_length, mapper_layers, mapper_heads, feature_tokens, max_regions, dropout
            )
        else:
            raise CaptionerError(f"mapper must be 'mlp' or 'transformer', got {mapper!r}.")
        self.lm.requires_grad_(train_lm is True)
        if train_lm == "lora":  # after resizing: the adapters wrap the final layers
            add_adapters(self.lm, LoraSettings(lora_rank, lora_alpha, lora_dropout, lora_targets))
        accepted = inspect.signature(self.lm.forward).parameters
        self._cache_argument = "cache" if "cache" in accepted else "past_key_values"  # transformers renamed it
        self._keeps_logits = "logits_to_keep" in accepted
        self._cache_class = transformers.DynamicCache
        self._positions = _position_limit(config)
        self.register_load_state_dict_pre_hook(_fit_adapters)

    # ------------------------------------------------------------ building
    def _check_vocabulary(self, config: Any, vocab_size: int) -> None:
        """A pretrained LM reads its own tokenizer's ids: refuse another tokenizer before anything is trained."""
        if not (self.hparams.pretrained and self.hparams.lm):
            return
        own = int(config.vocab_size)
        if not own <= vocab_size <= own + MOST_ADDED_TOKENS:
            raise CaptionerError(
                f"The language model {self.hparams.lm} has {own} tokens but the tokenizer has {vocab_size}: a "
                "pretrained LM reads its own tokenizer's ids. Set data.tokenizer to class_path: "
                f"captioner.text.Pretrained with init_args: {{model_id: {self.hparams.lm}}} (or pretrained: false)."
            )

    @staticmethod
    def _resize(lm: nn.Module, vocab_size: int) -> None:
        """The LM's embeddings and output layer sized for the tokenizer (rows added for its added tokens)."""
        if lm.get_input_embeddings().num_embeddings != vocab_size:
            lm.resize_token_embeddings(vocab_size, mean_resizing=False)

    def load_pretrained(self) -> None:
        if not (self.hparams.pretrained and self.hparams.lm):
            return
        import transformers

        try:
            pretrained = transformers.AutoModelForCausalLM.from_pretrained(self.hparams.lm)
        except Exception as error:  # the hub client raises many types when offline
            raise hub_error(str(self.hparams.lm), error) from error
        with seeded_initialisation():
            self._resize(pretrained, self.hparams.vocab_size)
        state = pretrained.state_dict()
        try:
            self.lm.load_state_dict(into_adapted(state, self.lm) if self._adapted else state)
        except RuntimeError as error:
            raise CaptionerError(
                f"The weights of {self.hparams.lm} do not fit the recorded lm_config ({error}); "
                "leave lm_config null to read it with the weights."
            ) from error

    def train(self, mode: bool = True) -> PrefixLMDecoder:
        super().train(mode)
        if self.hparams.train_lm is False:
            self.lm.eval()  # frozen: no dropout, as ClipCap (under LoRA it trains as peft trains it)
        return self

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not self.hparams.train_lm or self.hparams.lm_lr is None:
            return [{"params": trainable, "lr": lr}]
        lm = {id(p) for p in self.lm.parameters()}
        return [
            {"params": [p for p in trainable if id(p) not in lm], "lr": lr},
            {"params": [p for p in trainable if id(p) in lm], "lr": self.hparams.lm_lr},
        ]

    @property
    def _adapted(self) -> bool:
        return self.hparams.train_lm == "lora"

    @contextlib.contextmanager
    def export_mode(self) -> Iterator[None]:
        """The LM as exported: LoRA adapters merged into its weights, and its eager attention (PyTorch's ONNX
        exporter cannot convert `scaled_dot_product_attention` with grouped-query attention, as in Llama and Qwen2;
        eager attention computes the same, key and value heads repeated). Both are undone afterwards."""
        with contextlib.ExitStack() as undo:
            if self._adapted:
                undo.enter_context(merged_adapters(self.lm))
            previous = self.lm.config._attn_implementation
            if previous != "eager":
                self.lm.set_attn_implementation("eager")
                undo.callback(self.lm.set_attn_implementation, previous)
            yield

    def longest_caption(self) -> int | None:
        """The LM's positions hold the prefix and the words fed back (None when its config names no limit)."""
        return None if self._positions is None else self._positions - self.hparams.prefix_length

    # ------------------------------------------------------------ shared pieces
    def _prefix(self, features: torch.Tensor) -> torch.Tensor:
        """`(B, prefix_length, width)` from `(B, D)` or `(B, regions, D)` features."""
        regions = features.unsqueeze(1) if features.ndim == 2 else features
        batch, count, dim = regions.shape
        normed = self.feature_norm(regions.reshape(-1, dim)).view(batch, count, dim)
        return self.mapper(normed)

    def _run(self, embeds: torch.Tensor, cache: Any = None, use_cache: bool = False, keep: int = 0) -> Any:
        arguments = {"inputs_embeds": embeds, "use_cache": use_cache, self._cache_argument: cache}
        if keep and self._keeps_logits:
            arguments["logits_to_keep"] = keep  # the output layer only where captions are predicted
        return self.lm(**arguments)

    # ------------------------------------------------------------ teacher forcing
    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        return_attention: bool = False,
        owners: torch.Tensor | None = None,
    ) -> DecoderOutput:
        prefix = self._prefix(features)
        if owners is not None:
            prefix = prefix[owners]
        length = prefix.shape[1] + tokens.shape[1] - 1
        if self._positions is not None and length > self._positions:
            raise ValueError(
                f"a prefix of {prefix.shape[1]} and {tokens.shape[1]} tokens exceed the LM's "
                f"{self._positions} positions"
            )
        words = self.lm.get_input_embeddings()(tokens[:, 1:])  # the start token's place is the prefix's last vector
        output = self._run(torch.cat([prefix, words], dim=1), keep=tokens.shape[1])
        return DecoderOutput(output.logits[:, -tokens.shape[1] :])

    # ------------------------------------------------------------ step by step
    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """The prefix, `(B, prefix_length, width)`."""
        return self._prefix(features)

    def initial_state(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The LM's cache after the prefix's vectors but its last (which the first step feeds)."""
        seen = max(1, context.shape[1] - 1)
        output = self._run(context[:, :seen], use_cache=True)
        state = _flat_cache(output)
        return tuple(t[:, :, : context.shape[1] - 1] for t in state)  # a prefix of one: an empty cache

    def step(self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...], context: torch.Tensor):
        # The first step feeds the prefix's last vector in place of the start token. Which step this is comes from
        # the cache's length as a tensor (not a Python int), so an exported graph decides it at every step.
        seen = torch.ones_like(state[0][:, 0, :, :1]).sum(dim=1)  # (rows, 1)
        first = (seen == context.shape[1] - 1).unsqueeze(-1)
        words = self.lm.get_input_embeddings()(tokens.unsqueeze(1))
        embeds = torch.where(first, context[:, -1:].to(words.dtype), words)
        cache = self._cache_class(ddp_cache_data=list(zip(state[0::2], state[1::2], strict=True)))
        output = self._run(embeds, cache=cache, use_cache=True)
        return output.logits[:, -1], _flat_cache(output)


class GridPrefixLMDecoder(PrefixLMDecoder):
    """`PrefixLMDecoder` reading grid features (a CNN's last map, a ViT's patch tokens) through the Transformer
    mapper: the prefix queries attend to every region."""

    features = "grid"

    def __init__(self, vocab_size: int, feature_dim: int, **options: Any) -> None:
        options.setdefault("mapper", "transformer")
        if options["mapper"] != "transformer":
            raise CaptionerError("GridPrefixLMDecoder reads grid features through mapper: transformer.")
        super().__init__(vocab_size, feature_dim, **options)


def _fit_adapters(decoder: PrefixLMDecoder, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Before a state dict loads: an LM saved without adapters (a frozen or fully trained run) continues with LoRA;
    one saved with adapters into a decoder without them stops with what to set."""
    lm_prefix = f"{prefix}lm."
    keys = [key for key in state if key.startswith(lm_prefix)]
    saved_adapted = any(ADAPTER_MARK in key for key in keys)
    if saved_adapted and not decoder._adapted:
        raise CaptionerError(
            "The checkpoint's language model carries LoRA adapters (train_lm: lora): set "
            "model.decoder.init_args.train_lm to lora, with the lora_rank and lora_targets it was "
            "trained with."
        )
    if decoder._adapted and keys and not saved_adapted:
        plain = {key[len(lm_prefix) :]: state.pop(key) for key in keys}
        for key, value in into_adapted(plain, decoder.lm).items():
            state[lm_prefix + key] = value


def _flat_cache(output: Any) -> tuple[torch.Tensor, ...]:
    """An LM output's key/value cache as `(keys_0, values_0, keys_1, ...)`."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise CaptionerError(
            f"The language model's cache ({type(cache).__name__}) is not one key and value tensor "
            "per layer; PrefixLMDecoder needs a decoder-only LM such as GPT-2."
        )
    return tuple(tensor for layer in layers for tensor in (layer.keys, layer.values))


def _position_limit(config: Any) -> int | None:
    """The most positions the LM has (GPT-2: 1024), when its config says."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
