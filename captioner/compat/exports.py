"""Folders exported by older captioners, read as today's (`captioner.inference.manifest.ExportManifest`).

- Version 1 (captioner 0.2): a torchvision ResNet named by `backbone` and `weights`, squashed images, decoding
  settings under their 0.2 names, no encoder name, grid shape, decoder limit or calibrator.
- Version 2 (captioner 0.3): the step graph gives log-probabilities with the special tokens masked (version 3 gives
  logits; the search's rules and normalisation treat both alike), no decoder limit.
"""

from __future__ import annotations

from typing import Any

from captioner.compat.checkpoints import TORCHVISION_ENCODER
from captioner.compat.names import upgraded

# Version 3 is today's (`captioner.inference.manifest.EXPORT_VERSION`).
READABLE_VERSIONS = (1, 2, 3)


def upgrade_manifest(payload: dict[str, Any]) -> dict[str, Any]:
    """An older manifest's fields in today's form (today's is returned as it is)."""
    if payload.get("version") == 3:
        return payload
    payload = dict(payload)
    encoder = payload.get("encoder") or {}
    if "backbone" in encoder:  # 0.2: a torchvision ResNet by name, the images squashed
        size = int(payload["preprocessing"]["image_size"])
        payload["encoder"] = {
            "class_path": TORCHVISION_ENCODER,
            "init_args": {
                "model": encoder["backbone"],
                "weights": encoder.get("weights"),
                "image_size": size,
                "resize": "squash",
            },
        }
        payload.setdefault("encoder_name", encoder["backbone"])
    payload.setdefault("encoder_name", str(payload.get("encoder", {}).get("class_path", "an encoder")).rsplit(".")[-1])
    payload["decoding"] = upgraded(
        dict(payload.get("decoding") or {}), "the exported folder's decoding settings", quiet=True
    )
    payload.setdefault("grid_shape", None)
    payload.setdefault("longest_caption", None)  # their graphs fail on their own past it
    payload.setdefault("confidence", None)  # exports before 0.3 have no calibrator
    return payload
