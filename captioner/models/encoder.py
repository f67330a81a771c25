"""The frozen torchvision backbone that turns images into pooled feature vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision import models

from captioner.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from captioner.errors import CaptionerError

BACKBONES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
# Random initialisation is seeded so that `weights: null` gives the same network
# in extraction, in training and when a checkpoint is loaded for predict.
RANDOM_INIT_SEED = 0


def check_backbone(backbone: str, weights: str | None) -> None:
    """Fail early, naming the option, on an unknown backbone or weights name."""
    if backbone not in BACKBONES:
        raise CaptionerError(f"Unknown --data.backbone '{backbone}': choose one of {', '.join(BACKBONES)}.")
    if weights is not None:
        available = models.get_model_weights(backbone).__members__
        if weights not in available:
            raise CaptionerError(
                f"Unknown --data.weights '{weights}' for {backbone}: choose one of {', '.join(available)} or null."
            )


class ImageEncoder(nn.Module):
    """A torchvision ResNet without its classifier, frozen and always in eval mode.

    Takes uint8 `(B, 3, H, W)` RGB batches (or floats in [0, 1]) and returns
    globally average-pooled features `(B, feature_dim)`; normalisation (the
    last step of `captioner.data.preprocessing.Preprocessing`) happens here, on
    the encoder's device, so every caller feeds the same thing.

    Args:
        backbone: resnet18, resnet34, resnet50 or resnet101.
        weights: A torchvision weights name (e.g. "IMAGENET1K_V2") or None for a
            seeded random initialisation.
        pretrained: Load `weights` now. Pass False when a checkpoint's state
            dict will overwrite the parameters anyway (no download needed).
        mean: Per-channel mean of the normalisation (`Preprocessing.mean`).
        std: Per-channel standard deviation of the normalisation (`Preprocessing.std`).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        weights: str | None = "IMAGENET1K_V2",
        pretrained: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        check_backbone(backbone, weights)
        self.backbone_name, self.weights_name = backbone, weights
        self.feature_dim = BACKBONES[backbone]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            self.net = models.get_model(backbone, weights=None)
        self.net.fc = nn.Identity()
        self.net = self.net.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(tuple(mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(tuple(std)).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        if pretrained and weights is not None:
            self.load_pretrained()

    def load_pretrained(self) -> None:
        """Load the torchvision weights named by `weights` (downloaded once into $TORCH_HOME).

        Raises:
            CaptionerError: When the download fails, with the file to place by hand.
        """
        if self.weights_name is None:
            return
        spec = models.get_model_weights(self.backbone_name)[self.weights_name]
        try:
            state = spec.get_state_dict(progress=True, check_hash=True)
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            file_name = spec.url.rsplit("/", 1)[-1]
            raise CaptionerError(
                f"Could not fetch the {self.backbone_name} {self.weights_name} weights ({error}). "
                f"Without network access, copy {spec.url} to $TORCH_HOME/hub/checkpoints/{file_name} "
                "(TORCH_HOME defaults to ~/.cache/torch), or set --data.weights null for a random frozen backbone."
            ) from error
        state = {key: value for key, value in state.items() if not key.startswith("fc.")}
        self.net.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> ImageEncoder:
        """Stay in eval mode: batch-norm statistics of a frozen backbone must not move."""
        return super().train(False)

    @property
    def spec(self) -> dict:
        """What a feature cache and a checkpoint must agree on."""
        return {"backbone": self.backbone_name, "weights": self.weights_name}

    def forward(self, images: torch.Tensor, grid: bool = False) -> torch.Tensor:
        """Features for a batch of RGB images.

        Args:
            images: `(B, 3, H, W)` uint8 in [0, 255] or float in [0, 1].
            grid: Return the last convolutional map as regions instead of its average.

        Returns:
            `(B, feature_dim)` pooled features, or `(B, regions, feature_dim)` with
            `regions = h * w` of the last map (7 x 7 = 49 at 224 px).
        """
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return x.flatten(2).transpose(1, 2) if grid else x.mean(dim=(2, 3))  # the mean is ResNet's avgpool
