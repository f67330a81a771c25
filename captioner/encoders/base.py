"""The encoder protocol: what every image encoder provides, and all that extraction, training and captioning rely on.

An encoder is an `nn.Module` subclass of `ImageEncoder`, built from its own
options alone, which it records with `self.save_hyperparameters()`:

    class MyEncoder(ImageEncoder):
        def __init__(self, width: int = 256, image_size: int = 128):
            super().__init__()
            self.save_hyperparameters()              # recorded in checkpoints, caches and exports
            self.net = ...                           # the architecture, never downloading anything here
            self.use_preprocessing(Preprocessing(image_size, mean=..., std=...))

        def encode(self, pixels, grid) -> Tensor: ...   # normalised (B, 3, S, S) floats -> features
        def load_pretrained(self) -> None: ...          # fetch and load the weights (optional)
        def blocks(self) -> list[nn.Module]: ...        # input to output, for fine-tuning the last ones (optional)

What the rest of captioner relies on:

- `forward(images, grid=False)` takes `(B, 3, S, S)` RGB images, uint8 in
  [0, 255] or float in [0, 1], already resized by the encoder's
  `preprocessing`; it normalises them with the preprocessing's mean and std on
  the encoder's device and calls `encode`.
- `encode` returns pooled features `(B, feature_dim)`, or with `grid` the
  regions `(B, rows * columns, feature_dim)` in row-major order (a CNN's last
  map, a ViT's patch tokens without class or register tokens) with the same
  `feature_dim`, so a decoder that attends can also read a pooled vector as one
  region. An encoder without a grid raises `GridUnavailableError` there.
- `feature_dim` and `grid_shape` (`(rows, columns)` or None) are measured once
  on a blank image, so no encoder has to state them.
- `preprocessing` is the encoder's one definition of its input (size, resize
  and crop, interpolation, mean and std), resolved from its library; every
  path computes the same pixels from it.
- The constructor builds the architecture only and never touches the network
  (random weights seeded with `captioner.core.parts.seeded_initialisation`, so `pretrained: false`
  gives the same network everywhere); `load_pretrained` fetches the weights,
  once, and raises `CaptionerError` naming the cache to seed when offline.
  A checkpoint's state dict replaces them, so captioning from a checkpoint
  needs no network.
- `spec()` (class path and options) is what feature caches, checkpoints and
  exports key on; `name` is a short label for folders and tables.

Choose an encoder in the config by `class_path` (any importable class,
including one outside this package); the data side extracts with the same
instance the model captions with:

    model:
      encoder:
        class_path: captioner.encoders.TimmEncoder
        init_args: {model_name: convnext_tiny, pretrained: true}
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.core.mixins import HyperparametersMixin
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from captioner.core.errors import CaptionerError
from captioner.core.parts import class_path, import_trusted_class
from captioner.encoders.preprocessing import Preprocessing

TrainableBlocks = int | Literal["all"]


class GridUnavailableError(CaptionerError):
    """This encoder gives pooled features only."""


class ImageEncoder(nn.Module, HyperparametersMixin):
    """Base class and written protocol of image encoders (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.preprocessing: Preprocessing | None = None
        self.trainable_blocks: TrainableBlocks = 0
        self._probed: tuple[int, tuple[int, int] | None] | None = None
        self._pretrained_loaded = False
        self._modes_applied = False  # frozen parts (all of them, by default) go to eval mode before the first pass

    # ------------------------------------------------------------ what subclasses provide
    def encode(self, pixels: torch.Tensor, grid: bool) -> torch.Tensor:
        """Normalised `(B, 3, S, S)` float pixels -> `(B, D)` pooled or `(B, regions, D)` grid features."""
        raise NotImplementedError

    def fetch_pretrained(self) -> None:
        """Download (or read from the local cache) and load the pretrained weights; nothing by default."""

    def blocks(self) -> list[nn.Module]:
        """The encoder's stages from input to output, for training only the last ones (default: one block)."""
        return [self]

    @property
    def name(self) -> str:
        """A short label for folders and tables (default: the class name)."""
        return type(self).__name__

    # ------------------------------------------------------------ shared behaviour
    def use_preprocessing(self, preprocessing: Preprocessing) -> None:
        """Set the input definition; its mean and std become buffers, so normalising happens on the device."""
        self.preprocessing = preprocessing
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, grid: bool = False) -> torch.Tensor:
        """Features of `(B, 3, S, S)` images, uint8 in [0, 255] or float in [0, 1] (see the protocol)."""
        if self.preprocessing is None:
            raise CaptionerError(f"{type(self).__qualname__} did not call use_preprocessing() in its __init__.")
        if not self._modes_applied:
            self.train(self.training)
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        return self.encode((images - self.mean) / self.std, grid)

    def load_pretrained(self) -> None:
        """Load the pretrained weights once (extraction and the start of training call this; checkpoints don't)."""
        if not self._pretrained_loaded:
            self.fetch_pretrained()
            self._pretrained_loaded = True

    def mark_weights_loaded(self) -> None:
        """Record that the weights came from elsewhere (a checkpoint), so `load_pretrained` leaves them alone."""
        self._pretrained_loaded = True

    def _probe(self) -> tuple[int, tuple[int, int] | None]:
        """Feature size and grid shape, from one forward pass on a blank image (measured once)."""
        if self._probed is None:
            size = self.preprocessing.image_size
            blank = torch.zeros(1, 3, size, size, dtype=torch.uint8, device=self.mean.device)
            was_training = self.training
            self.eval()
            try:
                with torch.no_grad():
                    pooled = self(blank)
                    try:
                        regions = self(blank, grid=True)
                    except GridUnavailableError:
                        regions = None
            finally:
                self.train(was_training)
            shape = None
            if regions is not None:
                if regions.shape[-1] != pooled.shape[-1]:
                    raise CaptionerError(
                        f"{type(self).__qualname__} gives pooled features of size {pooled.shape[-1]} but grid features "
                        f"of size {regions.shape[-1]}: the protocol wants one feature_dim (see "
                        "captioner/encoders/base.py)."
                    )
                shape = grid_shape_of(regions.shape[1], size)
            self._probed = (int(pooled.shape[-1]), shape)
        return self._probed

    @property
    def feature_dim(self) -> int:
        """The size of one feature vector (pooled, or one region)."""
        return self._probe()[0]

    @property
    def grid_shape(self) -> tuple[int, int] | None:
        """`(rows, columns)` of the grid of regions, or None for an encoder with pooled features only."""
        return self._probe()[1]

    def spec(self) -> dict[str, Any]:
        """What rebuilds this encoder: its class path and options."""
        if not hasattr(self, "_hparams"):
            raise CaptionerError(
                f"{type(self).__qualname__} did not record its options: call self.save_hyperparameters() in its "
                "__init__ (see captioner/encoders/base.py)."
            )
        return {"class_path": class_path(type(self)), "init_args": dict(self.hparams)}

    # ------------------------------------------------------------ fine-tuning
    def set_trainable(self, blocks: TrainableBlocks) -> None:
        """Train the last `blocks` of `blocks()` ("all": every parameter; 0: none, the encoder frozen)."""
        stages = self.blocks()
        if blocks != "all" and not 0 <= int(blocks) <= len(stages):
            raise CaptionerError(
                f"--model.trainable_encoder_blocks {blocks}: {type(self).__name__} has {len(stages)} blocks; "
                f"choose 0 to {len(stages)} or 'all'."
            )
        self.trainable_blocks = blocks
        self.requires_grad_(blocks == "all")
        if blocks != "all" and blocks:
            for stage in stages[-int(blocks) :]:
                stage.requires_grad_(True)
        self.train(self.training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def train(self, mode: bool = True) -> ImageEncoder:
        """Frozen parts stay in eval mode, and so do batch norms everywhere: their statistics never move (batches
        of a captioning run are too small and too alike to re-estimate them)."""
        self._modes_applied = True
        nn.Module.train(self, False)
        self.training = mode  # what Lightning reads; the submodules follow the rules above
        if mode and self.trainable_blocks:
            stages = [self] if self.trainable_blocks == "all" else self.blocks()[-int(self.trainable_blocks) :]
            for stage in stages:
                nn.Module.train(stage, True)
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self


def grid_shape_of(regions: int, image_size: int) -> tuple[int, int]:
    """The `(rows, columns)` of a square input's grid of `regions` (row-major, as every built-in encoder gives)."""
    side = round(regions**0.5)
    if side * side != regions:
        raise CaptionerError(f"A grid of {regions} regions from a square {image_size} px image is not square.")
    return side, side


def encoder_trains(trainable_blocks: TrainableBlocks) -> bool:
    """Whether an encoder with this many trainable blocks learns (so its features cannot be cached); a config link."""
    return trainable_blocks == "all" or bool(trainable_blocks)


def encoder_from_spec(spec: dict[str, Any], source: str = "the checkpoint") -> ImageEncoder:
    """Rebuild an encoder from `ImageEncoder.spec()` (as checkpoints and caches hold it), architecture only.

    Raises:
        CaptionerError: When its class is not captioner's own nor in an allowed module (see
            `captioner.core.parts.import_trusted_class`), cannot be imported or is not an `ImageEncoder`.
    """
    cls = import_trusted_class(spec["class_path"], ImageEncoder, "encoder", source)
    return cls(**dict(spec.get("init_args") or {}))


def check_grid(encoder: ImageEncoder, features: str, decoder_name: str) -> None:
    """Refuse a decoder that attends over regions with an encoder that has none, naming both.

    Raises:
        CaptionerError: When `features` is "grid" and the encoder gives pooled features only.
    """
    if features == "grid" and encoder.grid_shape is None:
        raise CaptionerError(
            f"{decoder_name} attends over a grid of regions, but {encoder.name} ({type(encoder).__name__}) gives "
            "pooled features only. Choose a decoder that reads pooled features (LSTMDecoder) or an encoder with a "
            "grid (CNNs, ViTs)."
        )
