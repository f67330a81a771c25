"""Any torchvision classification model as an encoder: ResNets and other CNNs, and Vision Transformers."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import ResNet
from torchvision.models.vision_transformer import VisionTransformer

from captioner.core.errors import CaptionerError
from captioner.core.parts import seeded_initialisation
from captioner.encoders.base import ImageEncoder
from captioner.encoders.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

HEAD_NAMES = ("fc", "classifier", "head", "heads")


def _last_global_pool(net: nn.Module) -> tuple[str, nn.Module] | None:
    """The last `AdaptiveAvgPool2d` of a CNN: its input is the last feature map, its output the pooled vector."""
    found = None
    for name, module in net.named_modules():
        if isinstance(module, nn.AdaptiveAvgPool2d):
            found = (name, module)
    return found


class TorchvisionEncoder(ImageEncoder):
    """A torchvision classification model without its classifier.

    Pooled features are the classifier's input (the global average of the last
    feature map for CNNs, the class token for ViTs); the grid is the last feature
    map's positions (CNNs) or the patch tokens (ViTs).

    Args:
        model: A name `torchvision.models.get_model` knows (resnet50, efficientnet_b0, convnext_tiny, vit_b_16, ...).
        weights: A weights name of that model (IMAGENET1K_V2, DEFAULT, ...) or null for a seeded random
            initialisation (no download).
        image_size: Input side (null: the weights' crop size, else 224). ViTs need their own size.
        resize: "squash" (the whole frame to the square: nothing cut off) or "library" (the weights' evaluation
            transform: shorter side, centre crop, their interpolation).
    """

    def __init__(
        self,
        model: str = "resnet50",
        weights: str | None = "IMAGENET1K_V2",
        image_size: int | None = None,
        resize: Literal["squash", "library"] = "squash",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.weights_enum = _weights_of(model, weights)
        with seeded_initialisation():
            self.net = models.get_model(model, weights=None)
        transform = self.weights_enum.transforms() if self.weights_enum is not None else None
        size = image_size or (int(transform.crop_size[0]) if transform is not None else 224)
        if isinstance(self.net, VisionTransformer) and size != self.net.image_size:
            raise CaptionerError(
                f"{model} takes {self.net.image_size} px images, not {size}: set image_size to "
                f"{self.net.image_size} or null."
            )
        if isinstance(self.net, ResNet):
            self.net.fc = nn.Identity()  # the same module tree as captioner 0.2's ResNet encoder (its checkpoints load)
            self.net = self.net.to(memory_format=torch.channels_last)
            self._pool = None
        elif isinstance(self.net, VisionTransformer):
            self.net.heads = nn.Identity()
            self._pool = None
        else:
            pool = _last_global_pool(self.net)
            if pool is None:
                raise CaptionerError(
                    f"torchvision's {model} has no global average pooling module to take features "
                    "from; use captioner.encoders.TimmEncoder for it."
                )
            for head in HEAD_NAMES:  # the classifier is never needed, unless the pooling sits inside it
                if hasattr(self.net, head) and not pool[0].startswith(head + "."):
                    setattr(self.net, head, nn.Identity())
            self._pool = pool[1]
            self._captured: torch.Tensor | None = None
            self._pool.register_forward_hook(self._capture)
        if resize == "library" and transform is not None:
            interpolation = "bicubic" if "BICUBIC" in str(transform.interpolation) else "bilinear"
            preprocessing = Preprocessing(
                size,
                "shorter",
                interpolation,
                True,
                tuple(transform.mean),
                tuple(transform.std),
                max(size, round(size * transform.resize_size[0] / transform.crop_size[0])),
            )
        else:
            mean, std = (
                (tuple(transform.mean), tuple(transform.std))
                if transform is not None
                else (IMAGENET_MEAN, IMAGENET_STD)
            )
            preprocessing = Preprocessing(size, mean=mean, std=std)
        self.use_preprocessing(preprocessing)

    @property
    def name(self) -> str:
        return f"{self.hparams.model}-{self.hparams.weights or 'random'}"

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._captured = inputs[0]

    def fetch_pretrained(self) -> None:
        """Load the torchvision weights (downloaded once into $TORCH_HOME/hub/checkpoints).

        Raises:
            CaptionerError: When the download fails, with the file to place by hand.
        """
        spec = self.weights_enum
        if spec is None:
            return
        try:
            state = spec.get_state_dict(progress=True, check_hash=True)
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            file_name = spec.url.rsplit("/", 1)[-1]
            raise CaptionerError(
                f"Could not fetch the {self.hparams.model} {self.hparams.weights} weights ({error}). Without network "
                f"access, copy {spec.url} to $TORCH_HOME/hub/checkpoints/{file_name} (TORCH_HOME defaults to "
                "~/.cache/torch), or set weights: null for a random backbone."
            ) from error
        own = self.net.state_dict()
        self.net.load_state_dict({key: value for key, value in state.items() if key in own}, strict=True)

    def encode(self, pixels: torch.Tensor, grid: bool) -> torch.Tensor:
        net = self.net
        if isinstance(net, ResNet):
            x = pixels.contiguous(memory_format=torch.channels_last)
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
            return x.flatten(2).transpose(1, 2) if grid else x.mean(dim=(2, 3))  # the mean is ResNet's avgpool
        if isinstance(net, VisionTransformer):
            x = net._process_input(pixels)
            x = torch.cat([net.class_token.expand(x.shape[0], -1, -1), x], dim=1)
            tokens = net.encoder(x)
            return tokens[:, 1:] if grid else tokens[:, 0]
        net(pixels)
        feature_map, self._captured = self._captured, None
        return feature_map.flatten(2).transpose(1, 2) if grid else feature_map.mean(dim=(2, 3))

    def blocks(self) -> list[nn.Module]:
        net = self.net
        if isinstance(net, ResNet):
            return [nn.ModuleList([net.conv1, net.bn1]), net.layer1, net.layer2, net.layer3, net.layer4]
        if isinstance(net, VisionTransformer):
            layers = list(net.encoder.layers)
            return [
                nn.ModuleList([net.conv_proj, net.encoder.dropout]),
                *layers[:-1],
                nn.ModuleList([layers[-1], net.encoder.ln]),
            ]
        features = getattr(net, "features", None)
        if isinstance(features, nn.Sequential):
            return list(features)
        return [child for child in net.children() if any(True for _ in child.parameters())]


def _weights_of(model: str, weights: str | None):
    """The weights enum member, checked against the model (no download).

    Raises:
        CaptionerError: On an unknown model or weights name.
    """
    available_models = models.list_models(module=models)
    if model not in available_models:
        raise CaptionerError(
            f"Unknown torchvision model {model!r}: choose one of torchvision.models.list_models() "
            f"(e.g. resnet50, efficientnet_b0, convnext_tiny, vit_b_16)."
        )
    if weights is None:
        return None
    enum = models.get_model_weights(model)
    if weights == "DEFAULT":
        return enum.DEFAULT
    if weights not in enum.__members__:
        raise CaptionerError(
            f"Unknown weights {weights!r} for {model}: choose one of {', '.join(enum.__members__)}, DEFAULT or null."
        )
    return enum[weights]


def default_encoder() -> TorchvisionEncoder:
    """The encoder used when a config names none: torchvision's ImageNet ResNet50 (architecture only; its weights
    are fetched at the start of training). The model and the data side share one instance through the config link,
    so one of them builds it."""
    return TorchvisionEncoder()
