"""A Hugging Face transformers vision model as an encoder (`pip install 'captioner[hf]'`): CLIP, SigLIP, DINOv2, ViT
and others by model id."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from captioner.core.errors import CaptionerError
from captioner.core.hub import hub_error, transformers_config
from captioner.core.parts import require_library, seeded_initialisation
from captioner.encoders.base import ImageEncoder
from captioner.encoders.preprocessing import CLIP_MEAN, CLIP_STD, Preprocessing

PROCESSOR_KEYS = ("size", "crop_size", "do_center_crop", "resample", "image_mean", "image_std")
BICUBIC, BILINEAR = 3, 2  # PIL's resampling codes, as image processors record them


def _processor_settings(model_id: str) -> dict[str, Any]:
    """The input definition an image processor on the hub states (size, crop, resampling, mean and std)."""
    transformers = require_library("transformers", "hf", "HuggingFaceEncoder")
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(model_id)
    except Exception as error:  # the hub client raises many types when offline
        raise hub_error(model_id, error) from error
    settings = {key: getattr(processor, key, None) for key in PROCESSOR_KEYS}
    settings["resample"] = int(settings["resample"]) if settings["resample"] is not None else BICUBIC
    for key in ("size", "crop_size"):
        if settings[key] is not None and not isinstance(settings[key], dict):
            settings[key] = dict(settings[key])
    return settings


def _preprocessing(settings: dict[str, Any], config: Any) -> Preprocessing:
    """Our definition of an image processor's settings (or the model type's defaults without a processor)."""
    vision = getattr(config, "vision_config", config)
    model_type = getattr(config, "model_type", "")
    if not settings:
        mean, std = (CLIP_MEAN, CLIP_STD) if "clip" in model_type else ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        return Preprocessing(int(vision.image_size), interpolation="bicubic", mean=mean, std=std)
    interpolation = "bicubic" if settings.get("resample") == BICUBIC else "bilinear"
    options = {
        "interpolation": interpolation,
        "mean": tuple(map(float, settings["image_mean"])),
        "std": tuple(map(float, settings["image_std"])),
    }
    size, crop = settings.get("size") or {}, settings.get("crop_size") or {}
    if settings.get("do_center_crop") and crop:
        shorter = size.get("shortest_edge") or min(size.get("height", 0), size.get("width", 0)) or crop["height"]
        return Preprocessing(int(crop["height"]), "shorter", resize_size=int(shorter), **options)
    side = size.get("height") or size.get("shortest_edge") or int(vision.image_size)
    return Preprocessing(int(side), **options)


class HuggingFaceEncoder(ImageEncoder):
    """The vision tower of a transformers model.

    Pooled features are the model's pooled output (CLIP's image embedding, through
    its projection; SigLIP's attention pool; DINOv2's and ViT's class token); the
    grid is the patch tokens without class or register tokens (CLIP's through the
    same final norm and projection, so both have one size).

    Args:
        model_id: A hub id (openai/clip-vit-base-patch32, google/siglip-base-patch16-224,
            facebook/dinov2-small, google/vit-base-patch16-224-in21k, ...). Its config and image processor are read
            once (from the hub's cache when offline) and recorded in checkpoints.
        config: The model config as a dict (instead of reading it by id; a random model when there is no id).
        image_processor: The image processor's settings (size, crop_size, do_center_crop, resample, image_mean,
            image_std; read by id when null).
        pretrained: Load the id's weights when extracting or training (false: random weights, seeded).
    """

    def __init__(
        self,
        model_id: str | None = None,
        config: dict[str, Any] | None = None,
        image_processor: dict[str, Any] | None = None,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        transformers = require_library("transformers", "hf", "HuggingFaceEncoder")
        if model_id is None and config is None:
            raise CaptionerError(
                "HuggingFaceEncoder needs a model_id (a hub id such as facebook/dinov2-small) or a config."
            )
        if config is None:
            try:
                config = transformers.AutoConfig.from_pretrained(model_id).to_dict()
            except Exception as error:  # an unknown id and an offline machine both end here
                raise hub_error(model_id, error) from error
        if image_processor is None and model_id is not None:
            image_processor = _processor_settings(model_id)
        # Record what was read from the hub: a checkpoint then rebuilds this encoder without the network.
        self.save_hyperparameters(
            {"model_id": model_id, "config": config, "image_processor": image_processor, "pretrained": pretrained}
        )
        self._config = transformers_config(transformers, config, "HuggingFaceEncoder", "clip, siglip, dinov2, vit")
        with seeded_initialisation():
            model = transformers.AutoModel.from_config(self._config)
        self.vision, self.projection = _vision_parts(model)
        self.use_preprocessing(_preprocessing(image_processor or {}, self._config))

    @property
    def name(self) -> str:
        label = (self.hparams.model_id or self._config.model_type).replace("/", "--")
        return f"hf-{label}-{'pretrained' if self.hparams.pretrained and self.hparams.model_id else 'random'}"

    def fetch_pretrained(self) -> None:
        if not self.hparams.pretrained or self.hparams.model_id is None:
            return
        import transformers

        try:
            model = transformers.AutoModel.from_pretrained(self.hparams.model_id)
        except Exception as error:  # the hub client raises many types when offline
            raise hub_error(self.hparams.model_id, error) from error
        vision, projection = _vision_parts(model)
        self.vision.load_state_dict(vision.state_dict())
        if projection is not None:
            self.projection.load_state_dict(projection.state_dict())

    def encode(self, pixels: torch.Tensor, grid: bool) -> torch.Tensor:
        output = self.vision(pixel_values=pixels)
        if not grid:
            pooled = output.pooler_output
            if pooled is None:
                pooled = output.last_hidden_state.mean(dim=1)
            return self.projection(pooled) if self.projection is not None else pooled
        tokens = output.last_hidden_state
        vision_config = getattr(self._config, "vision_config", self._config)
        side = self.preprocessing.image_size // int(vision_config.patch_size)
        tokens = tokens[:, tokens.shape[1] - side * side :]  # without class and register tokens
        if self.projection is not None:  # CLIP: the pooled output went through post_layernorm, then the projection
            norm = getattr(self.vision, "post_layernorm", None)
            tokens = self.projection(norm(tokens) if norm is not None else tokens)
        return tokens

    def blocks(self) -> list[nn.Module]:
        encoder = getattr(self.vision, "encoder", None)
        layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
        if not layers:
            return [self]
        tail = [
            module
            for module in (
                getattr(self.vision, name, None) for name in ("layernorm", "post_layernorm", "head", "pooler")
            )
            if isinstance(module, nn.Module)
        ]
        if self.projection is not None:
            tail.append(self.projection)
        return [*list(layers)[:-1], nn.ModuleList([layers[-1], *tail])]


def _vision_parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The vision tower of a model (a CLIP or SigLIP model's `vision_model`, else the model) and CLIP's projection."""
    if hasattr(model, "vision_model"):
        return model.vision_model, getattr(model, "visual_projection", None)
    return model, None
