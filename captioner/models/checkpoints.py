"""Checkpoints as captioner writes them today: what it adds to Lightning's, how they are written (atomically) and read
(tensors and plain data only).

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

Older checkpoints are upgraded to this entry by `captioner.compat.checkpoints.upgrade`; building a model from
an entry is `captioner.models.building`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from captioner.compat.checkpoints import CAPTIONER_KEY, CHECKPOINT_VERSION
from captioner.core.errors import CaptionerError
from captioner.core.files import atomic_open, jsonable
from captioner.text.base import tokenizer_to_dict

__all__ = ["CAPTIONER_KEY", "CHECKPOINT_VERSION", "AtomicCheckpointIO", "meta_of", "read_checkpoint"]


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
        "vocabulary": tokenizer_to_dict(model.vocabulary),
        "blind": model.hparams.blind,
        "decoding": model.decoding.to_dict(),
        "confidence": _saved(model.confidence.calibrator),
        "confidence_clip": _saved(model.confidence.clip_calibrator),
    }


def _saved(calibrator: Any) -> dict[str, Any] | None:
    return None if calibrator is None else calibrator.to_dict()
