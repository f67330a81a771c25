"""The image tower of an OpenCLIP model as an encoder (`pip install 'captioner[clip]'`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from captioner.core.errors import CaptionerError
from captioner.core.hub import hub_error
from captioner.core.parts import require_library, seeded_initialisation
from captioner.encoders.base import GridUnavailableError, ImageEncoder
from captioner.encoders.preprocessing import Preprocessing


@contextlib.contextmanager
def _quiet_random_build() -> Iterator[None]:
    """OpenCLIP warns on the root logger when it builds a model without weights, which is what we ask for."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class OpenClipEncoder(ImageEncoder):
    """An OpenCLIP image tower.

    Pooled features are the image embedding (what CLIP compares with text);
    the grid is the patch tokens after the final layer norm, projected by the
    same matrix, so both have the embedding's size (ViT towers; ResNet towers
    give pooled features only).

    Args:
        model_name: An OpenCLIP model name (`open_clip.list_models()`: ViT-B-32, ViT-L-14, ViT-B-16-SigLIP, ...).
        pretrained: A pretrained tag for it (`open_clip.list_pretrained()`: openai, laion2b_s34b_b79k, ...), or
            null for a seeded random initialisation (no download).
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = "openai") -> None:
        super().__init__()
        self.save_hyperparameters()
        open_clip = require_library("open_clip", "clip", "OpenClipEncoder")
        if model_name not in open_clip.list_models():
            raise CaptionerError(
                f"Unknown OpenCLIP model {model_name!r}: choose one of open_clip.list_models() "
                "(e.g. ViT-B-32, ViT-B-16, ViT-L-14)."
            )
        if pretrained is not None and pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
            raise CaptionerError(
                f"Unknown pretrained tag {pretrained!r} for OpenCLIP {model_name}: choose one of {tags}, or null."
            )
        with seeded_initialisation(), _quiet_random_build():
            self.visual = open_clip.create_model(model_name, pretrained=None).visual
        config = dict(getattr(self.visual, "preprocess_cfg", {}) or {})
        if pretrained is not None:
            config.update(
                {
                    key: value
                    for key, value in open_clip.get_pretrained_cfg(model_name, pretrained).items()
                    if key in ("mean", "std", "interpolation", "resize_mode")
                }
            )
        size = config.get("size", getattr(self.visual, "image_size", 224))
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        resize = "squash" if config.get("resize_mode") == "squash" else "shorter"
        self.use_preprocessing(
            Preprocessing(
                size,
                resize,
                "bicubic" if config.get("interpolation", "bicubic") == "bicubic" else "bilinear",
                mean=tuple(config.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                std=tuple(config.get("std", (0.26862954, 0.26130258, 0.27577711))),
            )
        )

    @property
    def name(self) -> str:
        return f"openclip-{self.hparams.model_name}-{self.hparams.pretrained or 'random'}"

    def fetch_pretrained(self) -> None:
        if self.hparams.pretrained is None:
            return
        import open_clip

        try:
            model = open_clip.create_model(self.hparams.model_name, pretrained=self.hparams.pretrained)
        except Exception as error:  # urllib, the hub client and torch.load all fail differently when offline
            source = open_clip.get_pretrained_cfg(self.hparams.model_name, self.hparams.pretrained)
            repo = (source.get("hf_hub") or "").strip("/") or f"{self.hparams.model_name}/{self.hparams.pretrained}"
            raise hub_error(repo, error, extra=" (or, for weights served by URL, into ~/.cache/clip)") from error
        self.visual.load_state_dict(model.visual.state_dict())

    def encode(self, pixels: torch.Tensor, grid: bool) -> torch.Tensor:
        if not grid:
            return self.visual(pixels)
        if not hasattr(self.visual, "output_tokens") or not hasattr(self.visual, "proj"):
            raise GridUnavailableError(f"OpenCLIP {self.hparams.model_name}'s image tower gives no patch tokens.")
        self.visual.output_tokens = True
        try:
            _, tokens = self.visual(pixels)
        finally:
            self.visual.output_tokens = False
        return tokens @ self.visual.proj if self.visual.proj is not None else tokens

    def blocks(self) -> list[nn.Module]:
        transformer = getattr(self.visual, "transformer", None)
        if transformer is None:
            return [self.visual]
        layers = list(transformer.resblocks)
        tail = [m for m in (getattr(self.visual, "ln_post", None),) if isinstance(m, nn.Module)]
        return [*layers[:-1], nn.ModuleList([layers[-1], *tail])]
