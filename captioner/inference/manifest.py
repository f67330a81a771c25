"""The export manifest, one torch-free definition: `python -m captioner export` writes it, the exported runtime
(`captioner.inference.exported`) reads it, and a folder is checked as a whole against it when it is loaded.

    {"version": 3, "graphs": {"encoder": "encoder.onnx", "prepare": ..., "step": ...},
     "files": {"encoder.onnx": "<sha256>", ...},          # every file besides the manifest and its README
     "decoder": {...}, "encoder": {...}, "encoder_name": ..., "features": "pooled" | "grid", "grid_shape": ...,
     "preprocessing": {...}, "vocabulary": {...}, "decoding": {...}, "blind": false,
     "longest_caption": 63, "confidence": {...} | null,
     "state_count": 2, "context_count": 1, "context_per_image": true,
     "quantized": {"int8": false, "encoder": false}, "opset": 17}

Folders exported by captioner 0.2 (version 1) and early 0.3 (version 2) are read through
`captioner.compat.exports.upgrade_manifest`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.compat.exports import READABLE_VERSIONS, upgrade_manifest
from captioner.core.errors import CaptionerError
from captioner.core.files import write_json

EXPORT_VERSION = 3
MANIFEST = "manifest.json"
README = "README.md"


def file_digest(path: Path) -> str:
    """A file's SHA-256, as the manifest lists it."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ExportManifest:
    """What an exported folder holds and how its graphs are run (see the module docstring).

    Attributes:
        graphs: The encoder's, `prepare`'s and `step`'s file names.
        files: Every file of the folder but the manifest and its README, with its SHA-256.
        decoder, encoder: The parts' specs (class path and options), as checkpoints hold them.
        encoder_name: The encoder's name, for people.
        features: "pooled" or "grid".
        grid_shape: The grid's rows and columns (None: pooled).
        preprocessing: The encoder's preprocessing definition (`Preprocessing.to_dict()`).
        vocabulary: The tokenizer's `to_dict()`.
        decoding: The decoding settings (`DecodingConfig.to_dict()`).
        blind: Trained blind (zeroed image features).
        longest_caption: The most words the decoder writes step by step (None: no limit, or not recorded).
        confidence: The confidence calibrator's `to_dict()` (None: none).
        state_count, context_count: How many tensors the decoder's state and context are.
        context_per_image: The context has one row per image (not per beam).
        quantized: `{"int8": bool, "encoder": False | {"method": ...}}`.
        opset: The ONNX opset the graphs were written with.
        version: The manifest's version (`EXPORT_VERSION`).
    """

    graphs: dict[str, str]
    files: dict[str, str]
    decoder: dict[str, Any]
    encoder: dict[str, Any]
    encoder_name: str
    features: str
    grid_shape: list[int] | None
    preprocessing: dict[str, Any]
    vocabulary: dict[str, Any]
    decoding: dict[str, Any]
    blind: bool
    longest_caption: int | None
    confidence: dict[str, Any] | None
    state_count: int
    context_count: int
    context_per_image: bool
    quantized: dict[str, Any]
    opset: int
    version: int = EXPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: Any, source: str) -> ExportManifest:
        """A manifest from its JSON (an older version's upgraded first), every field there and of its type.

        Raises:
            CaptionerError: Naming the field that is missing or malformed.
        """
        if not isinstance(payload, dict) or payload.get("version") not in READABLE_VERSIONS:
            raise CaptionerError(f"{source} is of another export version; export the model again with this captioner.")
        payload = upgrade_manifest(payload)
        kinds = {
            "graphs": dict,
            "files": dict,
            "decoder": dict,
            "encoder": dict,
            "encoder_name": str,
            "features": str,
            "preprocessing": dict,
            "vocabulary": dict,
            "decoding": dict,
            "blind": bool,
            "state_count": int,
            "context_count": int,
            "context_per_image": bool,
            "quantized": dict,
            "opset": int,
        }
        for name, kind in kinds.items():
            if not isinstance(payload.get(name), kind):
                raise CaptionerError(f"{source} has no valid '{name}' ({kind.__name__}); export the model again.")
        known = {item.name for item in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in payload.items() if name in known})

    def write(self, folder: Path) -> None:
        """Into `folder` (atomically), its files' digests computed there."""
        write_json(Path(folder) / MANIFEST, self.to_dict())

    @classmethod
    def read(cls, folder: str | Path) -> ExportManifest:
        """The folder's manifest, with the folder checked as a whole against it.

        Every graph the runtime opens is listed with its SHA-256, every file in the folder besides the manifest and
        its README is listed, every listed file is there, unaltered, and no name leads out of the folder.

        Raises:
            CaptionerError: Naming the missing, extra, altered or escaping file, or the unreadable manifest.
        """
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise CaptionerError(f"{folder} is not an exported captioner: it has no {MANIFEST}.")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise CaptionerError(f"{path} is not valid JSON ({error}); export the model again.") from error
        manifest = cls.from_dict(payload, str(path))
        for name in [*manifest.files, *manifest.graphs.values()]:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise CaptionerError(f"{path} names {name!r}, which is not a file inside the folder: refused.")
        for graph, name in manifest.graphs.items():
            if name not in manifest.files:
                raise CaptionerError(f"The {graph} graph {name} is not listed with a digest in {path}: refused.")
        extra = sorted(p.name for p in folder.iterdir() if p.name not in (MANIFEST, README, *manifest.files))
        if extra:
            raise CaptionerError(
                f"{folder} holds {', '.join(extra)}, which its manifest does not list: refused. "
                "Export the model again into an empty folder."
            )
        for name, digest in manifest.files.items():
            file = folder / name
            if not file.is_file():
                raise CaptionerError(f"{folder} lacks {name}, which its manifest lists; export the model again.")
            if file_digest(file) != digest:
                raise CaptionerError(f"{file} was altered since export (its SHA-256 differs from the manifest's).")
        return manifest
