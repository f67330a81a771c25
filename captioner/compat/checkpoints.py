"""Checkpoints: what captioner adds to Lightning's, how they are written and read, and how older ones are upgraded.

Besides Lightning's state (weights, optimizer, loops), every checkpoint holds,
under the key `captioner`, everything captioning new images needs without the
dataset, the config or the network:

    {"version": 4,
     "decoder": {"class_path": ..., "init_args": {...}},     # CaptionDecoder.spec()
     "encoder": {"class_path": ..., "init_args": {...}},     # ImageEncoder.spec()
     "trainable_encoder_blocks": 0,                           # how the encoder was trained
     "preprocessing": {...},                                  # Preprocessing.to_dict(), the encoder's
     "vocabulary": {...},                                     # the tokenizer's to_dict() (captioner.text)
     "blind": false,
     "decoding": {...}}                                       # DecodingConfig.to_dict()

Checkpoints of captioner 0.1 (the decoder named by a string in the
hyperparameters, the vocabulary beside them), 0.2 (a torchvision ResNet named
by `backbone` and `weights`, version 2) and of 0.3's first weeks (version 3:
decoding settings under their 0.2 names) are read through `upgrade`, so they
keep working (tested on files those versions wrote: tests/fixtures/old/).
Building a model from an entry is `captioner.models.building`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from captioner.core.errors import CaptionerError
from captioner.core.files import atomic_open, jsonable
from captioner.decoding.config import DecodingConfig
from captioner.encoders.preprocessing import Preprocessing

CHECKPOINT_VERSION = 4
TORCHVISION_ENCODER = "captioner.encoders.torchvision_models.TorchvisionEncoder"
CAPTIONER_KEY = "captioner"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save checkpoints to a temporary file in the target folder and rename it into place.

    Lightning's own save goes through an fsspec transaction whose temporary
    file lives in the system temp folder; when that is another file system
    the final step is a copy, which a full disk can cut short. Renaming
    within one folder is atomic: a checkpoint is complete or absent.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        with atomic_open(path, "wb") as handle:
            torch.save(checkpoint, handle)


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint file (tensors and plain data only: nothing in it is executed).

    Args:
        path: The file.
        mmap: Map the tensors instead of reading them (to check a file before a command starts: cheap).

    Raises:
        CaptionerError: When the file is missing or cannot be read as a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"Checkpoint {path} does not exist.")
    if path.stat().st_size == 0:
        raise CaptionerError(f"Checkpoint {path} is empty (0 bytes): a copy or download cut short?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise CaptionerError(
            f"{path} is not a captioner checkpoint: it cannot be read as a PyTorch file of tensors and plain data "
            f"({type(error).__name__}: {_reason(error)}). Give a checkpoint `fit` wrote (last.ckpt, epochNN-*.ckpt), "
            "or an exported or published folder; a checkpoint holding other objects is refused, never unpickled."
        ) from error


def _reason(error: Exception) -> str:
    """The part of torch's message that says what failed (its weights-only refusal is a page of advice, including
    to load the file unsafely, which is not ours to give)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error:" in line), None)
    if marker is None:
        return lines[0] if lines else "unreadable"
    detail = lines[marker].partition("WeightsUnpickler error:")[2].strip()
    if not detail and marker + 1 < len(lines):
        detail = lines[marker + 1]
    return detail.split(". ")[0].rstrip(".") or "not tensors and plain data"


def meta_of(model: Any) -> dict[str, Any]:
    """What captioning with `model` (a `CaptionModel`) needs besides the weights: the `captioner` entry."""
    return {
        "version": CHECKPOINT_VERSION,
        "decoder": model.require_decoder().spec(),
        "encoder": jsonable(model.encoder.spec()),
        "trainable_encoder_blocks": model.hparams.trainable_encoder_blocks,
        "preprocessing": model.preprocessing.to_dict(),
        "vocabulary": model.vocabulary.to_dict(),
        "blind": model.hparams.blind,
        "decoding": model.decoding.to_dict(),
        "confidence": model.calibrator.to_dict() if getattr(model, "calibrator", None) is not None else None,
        "confidence_clip": (model.clip_calibrator.to_dict() if getattr(model, "clip_calibrator", None) is not None
                            else None),  # fmt: skip
    }


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's `captioner` entry, made from an older checkpoint's if need be.

    Raises:
        CaptionerError: When the checkpoint was not written by captioner.
    """
    if CAPTIONER_KEY in checkpoint:
        meta = checkpoint[CAPTIONER_KEY]
        if isinstance(meta, dict) and meta.get("version") == 2:
            return _from_version_2(meta)
        if isinstance(meta, dict) and meta.get("version") == 3:  # decoding settings under their 0.2 names
            return {**meta, "version": CHECKPOINT_VERSION, "decoding": _decoding_of(meta["decoding"])}
        if not isinstance(meta, dict) or meta.get("version") != CHECKPOINT_VERSION:
            raise CaptionerError(
                f"This checkpoint's format (version {meta.get('version') if isinstance(meta, dict) else '?'}) is "
                f"not the one this captioner reads ({CHECKPOINT_VERSION}): upgrade captioner."
            )
        return meta
    if "vocabulary" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CaptionerError("This checkpoint was not written by captioner (it has no vocabulary).")
    hp = checkpoint["hyper_parameters"]
    if hp.get("decoder", "lstm") == "attention":
        decoder = {"class_path": "captioner.models.decoders.attention.AttentionDecoder",
                   "init_args": {"embed_dim": hp.get("embed_dim", 256), "hidden_dim": hp.get("hidden_dim", 512),
                                 "attention_dim": hp.get("attention_dim", 256), "dropout": hp.get("dropout", 0.5),
                                 "regularization": hp.get("attention_regularization", 1.0)}}  # fmt: skip
    else:
        decoder = {"class_path": "captioner.models.decoders.lstm.LSTMDecoder",
                   "init_args": {"embed_dim": hp.get("embed_dim", 256), "hidden_dim": hp.get("hidden_dim", 512),
                                 "num_layers": hp.get("num_layers", 1), "dropout": hp.get("dropout", 0.5)}}  # fmt: skip
    preprocessing = checkpoint.get("preprocessing") or Preprocessing(hp.get("image_size", 224)).to_dict()
    return _from_version_2(
        {
            "version": 2,
            "decoder": decoder,
            "encoder": {"backbone": hp.get("backbone", "resnet50"), "weights": hp.get("weights", "IMAGENET1K_V2")},
            "preprocessing": preprocessing,
            "vocabulary": checkpoint["vocabulary"],
            "blind": bool(hp.get("blind", False)),
            "decoding": {
                key: hp.get(key, default)
                for key, default in (("beam_size", 3), ("length_penalty", 0.0), ("max_decode_length", None))
            },  # fmt: skip
        }
    )


def _from_version_2(meta: dict[str, Any]) -> dict[str, Any]:
    """A captioner 0.2 entry (a torchvision ResNet by `backbone` and `weights`, squashed images) in this version."""
    encoder = meta["encoder"]
    size = int(meta["preprocessing"]["image_size"])
    spec = {"class_path": TORCHVISION_ENCODER, "init_args": {"model": encoder["backbone"],
            "weights": encoder["weights"], "image_size": size, "resize": "squash"}}  # fmt: skip
    return {
        **meta,
        "version": CHECKPOINT_VERSION,
        "encoder": spec,
        "trainable_encoder_blocks": 0,
        "decoding": _decoding_of(meta["decoding"]),
    }


def _decoding_of(old: dict[str, Any]) -> dict[str, Any]:
    return DecodingConfig.from_dict(old, "the checkpoint's decoding settings").to_dict()
