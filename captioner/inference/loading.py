"""A captioner for whatever a user points at: a checkpoint file or a published folder or hub id (`Captioner`, torch),
or an exported folder (`OnnxCaptioner`, ONNX Runtime); both implement `CaptionerProtocol`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from captioner.core.errors import CaptionerError
from captioner.inference.protocol import CaptionerProtocol


def load_captioner(
    path: str | Path, device: str | None = None, rerank_clip: str | None = None, **overrides: Any
) -> CaptionerProtocol:
    """A captioner for a checkpoint file (torch, on `device`: None or "auto" for a GPU when there is one) or an
    exported folder (ONNX Runtime); `rerank_clip`: a CLIP model reordering the beam's alternatives by CLIPScore
    (torch only); `overrides`: decoding settings replacing the model's own.

    Raises:
        CaptionerError: When the path is neither, the settings cannot run on the model, or reranking is asked of an
            exported folder.
    """
    from captioner.published import is_published

    path, device = Path(path), None if device in (None, "auto") else device
    if path.is_dir() and is_published(path) or not path.exists() and _looks_like_hub_id(str(path)):
        from captioner.inference.checkpoint import Captioner

        return Captioner.from_pretrained(
            path if path.is_dir() else str(path), device, rerank_clip=rerank_clip, **overrides
        )
    if path.is_dir():
        from captioner.inference.exported import OnnxCaptioner

        if rerank_clip is not None:
            raise CaptionerError(
                f"{path} is an exported folder, run without torch: reranking by CLIPScore runs CLIP "
                "in PyTorch. Caption with the checkpoint (or a published folder) to rerank, or "
                "leave out --rerank_clip."
            )
        return OnnxCaptioner(path, **overrides)
    if not path.is_file():
        raise CaptionerError(
            f"{path} is neither a checkpoint file, an exported or published folder, nor a hub id (user/name)."
        )
    from captioner.inference.checkpoint import Captioner

    return Captioner.from_checkpoint(path, device, rerank_clip=rerank_clip, **overrides)


def _looks_like_hub_id(name: str) -> bool:
    """`user/name`: two parts, no path beyond them (a missing local file has more or starts with . or /)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def check_model(path: str | Path) -> None:
    """Refuse, in the one line `caption` prints and before anything starts (a server, a job), what a command would
    load as a model: a checkpoint that is not one or names classes nobody allowed
    (`captioner.models.building.check_checkpoint_file`), an exported folder that does not check out against its
    manifest, or a path that is none of a checkpoint, an exported or published folder and a hub id.

    Raises:
        CaptionerError: Saying what failed and what to give instead.
    """
    from captioner.published import is_published

    path = Path(path)
    if path.is_dir():
        if is_published(path):
            return
        from captioner.inference.manifest import MANIFEST, ExportManifest
        from captioner.text.base import tokenizer_from_dict

        manifest = ExportManifest.read(path)
        tokenizer_from_dict(manifest.vocabulary, str(path / MANIFEST), built_in_only=True)
        return
    if not path.exists():
        if _looks_like_hub_id(str(path)):
            return
        raise CaptionerError(
            f"{path} does not exist: give a checkpoint `fit` wrote, an exported or published "
            "folder, or a hub id (user/name)."
        )
    from captioner.models.building import check_checkpoint_file

    check_checkpoint_file(path)
