"""Any timm model as an encoder (`pip install 'captioner[timm]'`): its grid from `forward_features`, its input
definition from its `pretrained_cfg`."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from captioner.core.errors import CaptionerError
from captioner.core.hub import hub_error
from captioner.core.parts import require_library, seeded_initialisation
from captioner.encoders.base import ImageEncoder
from captioner.encoders.preprocessing import Preprocessing


class TimmEncoder(ImageEncoder):
    """A `timm.create_model(model_name, num_classes=0)` backbone.

    Pooled features are `forward_head(..., pre_logits=True)` (the model's own
    pooling: average, class token or attention pool); the grid is
    `forward_features` without its prefix (class and register) tokens.

    Args:
        model_name: Any name `timm.list_models()` knows, with an optional pretrained tag
            (convnext_tiny.fb_in22k, vit_base_patch14_dinov2.lvd142m, ...).
        pretrained: Load the pretrained weights from the Hugging Face hub (cached) when extracting or training.
        image_size: Input side (null: the model's pretrained input size). ViTs are built for that size.
        resize: "library" (the model's evaluation transform: shorter side by its crop_pct, centre crop, its
            interpolation) or "squash" (the whole frame to the square, its interpolation, mean and std).
    """

    def __init__(
        self,
        model_name: str = "resnet50",
        pretrained: bool = True,
        image_size: int | None = None,
        resize: Literal["library", "squash"] = "library",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        timm = require_library("timm", "timm", "TimmEncoder")
        if not timm.list_models(model_name.split(".")[0]) and not timm.list_pretrained(model_name):
            raise CaptionerError(
                f"Unknown timm model {model_name!r}: see timm.list_models() (e.g. resnet50, convnext_tiny, "
                "vit_base_patch16_clip_224.openai, vit_small_patch14_dinov2)."
            )
        with seeded_initialisation():
            self.net = self._create(pretrained=False)
        config = timm.data.resolve_data_config({}, model=self.net)
        size = image_size or int(config["input_size"][-1])
        interpolation = "bicubic" if config.get("interpolation") == "bicubic" else "bilinear"
        options = {"interpolation": interpolation, "mean": tuple(config["mean"]), "std": tuple(config["std"])}
        if resize == "library" and config.get("crop_mode", "center") != "squash":
            preprocessing = Preprocessing.with_crop_fraction(size, float(config.get("crop_pct", 1.0)), **options)
        else:
            preprocessing = Preprocessing(size, **options)
        self.use_preprocessing(preprocessing)

    def _create(self, pretrained: bool) -> nn.Module:
        import timm

        options = {"pretrained": pretrained, "num_classes": 0}
        if self.hparams.image_size:
            try:  # ViTs are built for their input size; CNNs take any size and refuse the argument
                return timm.create_model(self.hparams.model_name, img_size=self.hparams.image_size, **options)
            except TypeError:
                pass
        return timm.create_model(self.hparams.model_name, **options)

    @property
    def name(self) -> str:
        return f"timm-{self.hparams.model_name}-{'pretrained' if self.hparams.pretrained else 'random'}"

    def fetch_pretrained(self) -> None:
        if not self.hparams.pretrained:
            return
        try:
            pretrained = self._create(pretrained=True)
        except Exception as error:  # the hub client raises many types when offline
            raise hub_error(f"timm/{self.hparams.model_name}", error) from error
        self.net.load_state_dict(pretrained.state_dict())

    def encode(self, pixels: torch.Tensor, grid: bool) -> torch.Tensor:
        features = self.net.forward_features(pixels)
        if not grid:
            return self.net.forward_head(features, pre_logits=True)
        if features.ndim == 4:  # a feature map: NCHW, or NHWC for models that say so (Swin, ...)
            if getattr(self.net, "output_fmt", "NCHW") == "NHWC" or features.shape[1] != self.net.num_features:
                features = features.permute(0, 3, 1, 2)
            return features.flatten(2).transpose(1, 2)
        return features[:, getattr(self.net, "num_prefix_tokens", 0) :]

    def blocks(self) -> list[nn.Module]:
        net = self.net
        for name in ("blocks", "stages", "layers"):
            stages = getattr(net, name, None)
            if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages):
                tail = [
                    getattr(net, name)
                    for name in ("norm", "fc_norm", "head")
                    if isinstance(getattr(net, name, None), nn.Module)
                ]
                return [*list(stages)[:-1], nn.ModuleList([stages[-1], *tail])]
        if all(hasattr(net, f"layer{i}") for i in range(1, 5)):  # ResNets
            return [getattr(net, f"layer{i}") for i in range(1, 5)]
        return [child for child in net.children() if any(True for _ in child.parameters())]
