"""What a set of cached features depends on, as one key: the encoder's spec and preprocessing, pooled or grid, the
decode path and the encoder's precision, and the images. Another of any of them is another feature set."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from captioner.core.files import jsonable
from captioner.core.hardware import bf16_autocast_available
from captioner.encoders.base import ImageEncoder
from captioner.encoders.image_files import CPU_DECODE, DEVICE_DECODE
from captioner.encoders.preprocessing import Preprocessing

FEATURES_VERSION = 4


def extraction_method(device: torch.device | str, device_decode: bool | None = None) -> tuple[str, str]:
    """How features are computed on `device`: the decode path and the encoder's precision.

    A GPU decodes JPEGs with nvJPEG (other files with PIL) and runs the encoder
    in bf16 autocast where bf16 is native; a CPU decodes with PIL and runs in fp32.
    Both are part of the key: features computed one way are never read as the other's.
    """
    device = torch.device(device)
    decode = DEVICE_DECODE if (device.type == "cuda" if device_decode is None else device_decode) else CPU_DECODE
    precision = "bf16" if device.type == "cuda" and bf16_autocast_available(device) else "fp32"
    return decode, precision


def cache_key(
    encoder: dict[str, Any],
    preprocessing: Preprocessing,
    file_names: list[str],
    grid: bool = False,
    decode: str = CPU_DECODE,
    precision: str = "fp32",
) -> str:
    """A digest of everything the features depend on (`encoder` is `ImageEncoder.spec()`)."""
    spec = {
        "version": FEATURES_VERSION,
        "encoder": encoder,
        "grid": grid,
        "preprocessing": preprocessing.to_dict(),
        "decode": decode,
        "precision": precision,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for name in file_names:
        digest.update(name.encode() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class FeatureSpec:
    """What features are besides the images and the device that computes them.

    Attributes:
        encoder: The encoder (its spec and preprocessing are part of the key).
        grid: The grid of regions (for decoders that attend) instead of the pooled vector.
    """

    encoder: ImageEncoder
    grid: bool = False

    @property
    def encoder_spec(self) -> dict[str, Any]:
        return jsonable(self.encoder.spec())

    @property
    def preprocessing(self) -> Preprocessing:
        return self.encoder.preprocessing

    def key(self, file_names: list[str], device: torch.device | str = "cpu", device_decode: bool | None = None) -> str:
        """The key of these images' features when extracted on `device`."""
        decode, precision = extraction_method(device, device_decode)
        return cache_key(self.encoder_spec, self.preprocessing, file_names, self.grid, decode, precision)

    def folder_name(self, key: str) -> str:
        """A readable folder name for a feature set with this key (people clean these up)."""
        kind = "grid-" if self.grid else ""
        return f"{self.encoder.name}-{self.preprocessing.image_size}px-{kind}{key[:12]}"

    def directory(self, root: str | Path, key: str) -> Path:
        return Path(root) / self.folder_name(key)

    def row_shape(self) -> tuple[int, ...]:
        """One image's feature shape: `(D,)` pooled, `(regions, D)` grid."""
        if not self.grid:
            return (self.encoder.feature_dim,)
        rows, columns = self.encoder.grid_shape
        return (rows * columns, self.encoder.feature_dim)
