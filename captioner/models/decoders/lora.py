"""LoRA adapters on a language model (Hu et al. 2021), through `peft` (`pip install 'captioner[lora]'`).

The adapters are injected into the LM module itself (`peft.inject_adapter_in_model`), not by wrapping it in a
`PeftModel`: the LM keeps its forward signature and its place in the decoder, a checkpoint holds the adapters beside
the frozen weights (each adapted layer's weight under `<layer>.base_layer.weight`), and the decoder's code reads the
same with or without them. Export merges the adapters into the weights (`merged_adapters`), so an exported model is
a plain LM for the runtime and needs neither peft nor extra operators.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from captioner.core.errors import CaptionerError
from captioner.core.parts import require_library, seeded_initialisation

ADAPTER_MARK = ".lora_"


@dataclass(frozen=True)
class LoraSettings:
    """The shape of the adapters.

    Attributes:
        rank: Rank of each update `B @ A`.
        alpha: Scale numerator: updates are multiplied by `alpha / rank`.
        dropout: Dropout on the adapters' input while training.
        targets: Names of the modules adapted (suffixes such as `q_proj`); None takes peft's default for the LM's
            model type (GPT-2: c_attn; OPT, GPT-Neo, Llama, Qwen2: q_proj and v_proj; GPT-NeoX: query_key_value).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise CaptionerError(f"lora_rank must be at least 1, got {self.rank}.")
        if self.alpha <= 0:
            raise CaptionerError(f"lora_alpha must be positive, got {self.alpha}.")
        if not 0 <= self.dropout < 1:
            raise CaptionerError(f"lora_dropout must be in [0, 1), got {self.dropout}.")


def add_adapters(lm: nn.Module, settings: LoraSettings) -> list[str]:
    """Inject LoRA adapters into `lm` in place; only they train afterwards.

    Args:
        lm: A Hugging Face causal LM (its `config.model_type` picks the default targets).
        settings: Rank, alpha, dropout and target modules.

    Returns:
        The names of the adapted modules.

    Raises:
        CaptionerError: When peft is missing, no default targets are known for the model type, or a target names
            no module.
    """
    peft = require_library("peft", "lora", "train_lm: lora")
    model_type = getattr(lm.config, "model_type", "?")
    targets = list(settings.targets) if settings.targets else _default_targets(peft, model_type)
    found = sorted({name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()})
    missing = [target for target in targets if target not in found]
    if missing:
        raise CaptionerError(
            f"lora_targets {missing} name no module of this {model_type} LM; its modules "
            f"include {[n for n in found if n and not n.isdigit()][:30]}."
        )
    adapted = [name for name, _ in lm.named_modules() if name.rsplit(".", 1)[-1] in targets]
    # GPT-2 stores its projections transposed (Conv1D): say so rather than let peft warn and flip it.
    transposed = any(type(lm.get_submodule(name)).__name__ == "Conv1D" for name in adapted)
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        fan_in_fan_out=transposed,
        bias="none",
    )
    with seeded_initialisation():  # A's initialisation is random: the same adapters for the same seed
        peft.inject_adapter_in_model(config, lm)
    return adapted


def _default_targets(peft: Any, model_type: str) -> list[str]:
    defaults = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    if model_type not in defaults:
        raise CaptionerError(
            f"peft knows no default LoRA targets for the {model_type} LM: set lora_targets to the "
            "names of its attention projections (for example [q_proj, v_proj])."
        )
    return list(defaults[model_type])


def adapter_parameters(lm: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (what trains under LoRA)."""
    return [parameter for name, parameter in lm.named_parameters() if ADAPTER_MARK in name]


def into_adapted(state: dict[str, torch.Tensor], lm: nn.Module) -> dict[str, torch.Tensor]:
    """A plain LM's state dict (pretrained weights, a checkpoint trained without adapters) renamed for `lm` with
    adapters: each adapted layer's weights go under its `base_layer`; the adapters keep their initialisation.

    Raises:
        CaptionerError: When a weight has no place in `lm`.
    """
    expected = lm.state_dict()
    renamed = {}
    for key, value in state.items():
        if key not in expected:
            module, _, leaf = key.rpartition(".")
            based = f"{module}.base_layer.{leaf}"
            if based not in expected:
                raise CaptionerError(f"The language model's weight {key} has no place in the adapted LM.")
            key = based
        renamed[key] = value
    for key, value in expected.items():
        if ADAPTER_MARK in key:
            renamed[key] = value
    return renamed


@contextlib.contextmanager
def merged_adapters(lm: nn.Module) -> Iterator[None]:
    """Adapters folded into the weights for the duration (what export traces: one matrix per layer, no peft
    operators); the exact weights are restored afterwards (unmerging would leave rounding in the frozen weights)."""
    from peft.tuners.lora import LoraLayer

    layers = [module for module in lm.modules() if isinstance(module, LoraLayer)]
    saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        for layer, weight in zip(layers, saved, strict=True):
            layer.unmerge()
            with torch.no_grad():
                layer.get_base_layer().weight.copy_(weight)
