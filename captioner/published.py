"""Reading a published captioner (`python -m captioner publish` writes one, `captioner.publish`): a folder with
`model.safetensors`, `config.json` and the tokenizer, or a Hugging Face Hub id whose snapshot is one.

Loading lives apart from publishing: `Captioner.from_pretrained` reads a folder without importing what writes cards
and measures speed (which itself captions with `Captioner`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from captioner.core.errors import CaptionerError
from captioner.core.hub import hub_error
from captioner.core.parts import require_library
from captioner.models.checkpoints import CAPTIONER_KEY

PUBLISHED_FORMAT = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def is_published(folder: str | Path) -> bool:
    """Whether `folder` is a published captioner (its config and weights)."""
    return (Path(folder) / CONFIG).is_file() and (Path(folder) / WEIGHTS).is_file()


def published_folder(name: str | Path) -> Path:
    """A published captioner's folder: `name` itself, or a hub id's snapshot (downloaded, or from the cache offline).

    Raises:
        CaptionerError: When it is neither a published folder nor a repository the hub (or its cache) has.
    """
    if Path(name).is_dir():
        if not is_published(name):
            raise CaptionerError(
                f"{name} holds no published captioner ({CONFIG} and {WEIGHTS}): write one with "
                "`python -m captioner publish`."
            )
        return Path(name)
    huggingface_hub = require_library("huggingface_hub", "hub", "from_pretrained")
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id=str(name)))
    except Exception as error:  # the hub client raises many types when offline or when the id is unknown
        raise hub_error(str(name), error) from error
    if not is_published(folder):
        raise CaptionerError(f"The hub repository {name} holds no published captioner ({CONFIG} and {WEIGHTS}).")
    return folder


def model_from_published(name: str | Path, **overrides: Any) -> Any:
    """A `CaptionModel` rebuilt from a published folder or hub id; `overrides`: decoding settings.

    Raises:
        CaptionerError: When the folder cannot be found or read, or is of a newer format.
    """
    from safetensors.torch import load_file

    from captioner.models import building
    from captioner.models.module import CaptionModel

    folder = published_folder(name)
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        state = load_file(folder / WEIGHTS)
    except (OSError, ValueError) as error:
        raise CaptionerError(
            f"{folder} is not a readable published captioner ({type(error).__name__}: {error})."
        ) from error
    if not isinstance(config, dict) or CAPTIONER_KEY not in config:
        raise CaptionerError(f"{folder / CONFIG} is not a captioner config (no {CAPTIONER_KEY!r} entry).")
    if int(config.get("captioner_format", 0)) > PUBLISHED_FORMAT:
        raise CaptionerError(
            f"{folder} was published by a newer captioner (format {config['captioner_format']}): upgrade captioner."
        )
    checkpoint = {CAPTIONER_KEY: config[CAPTIONER_KEY], "state_dict": state}
    return building.model_from_checkpoint_data(CaptionModel, checkpoint, f"The published model {name}", **overrides)
