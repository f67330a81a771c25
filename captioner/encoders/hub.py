"""Where the Hugging Face hub keeps downloads, for messages that tell an offline user what to seed."""

from __future__ import annotations

import os
from pathlib import Path

from captioner.errors import CaptionerError


def hub_cache() -> Path:
    """The hub's cache folder on this machine (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def hub_folder(repo_id: str) -> Path:
    """The cache folder of one hub repository (`models--org--name`)."""
    return hub_cache() / ("models--" + repo_id.strip("/").replace("/", "--"))


def hub_error(repo_id: str, error: BaseException, extra: str = "") -> CaptionerError:
    """A download from the hub failed: say what, and which folder to seed on a machine without network."""
    return CaptionerError(
        f"Could not fetch {repo_id} from the Hugging Face hub ({type(error).__name__}: {error}). Without network "
        f"access, copy that repository's cached snapshot from a machine that has it into {hub_folder(repo_id)} "
        f"(the cache is HF_HUB_CACHE or HF_HOME/hub){extra}, and set HF_HUB_OFFLINE=1."
    )
