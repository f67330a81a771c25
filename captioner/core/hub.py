"""Where the Hugging Face hub keeps downloads, for messages that tell an offline user what to seed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from captioner.core.errors import CaptionerError


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
    reason = " ".join(str(error).split())  # one line: the hub client's messages run over several
    return CaptionerError(
        f"Could not fetch {repo_id} from the Hugging Face hub ({type(error).__name__}: {reason}). Without network "
        f"access, copy that repository's cached snapshot from a machine that has it into {hub_folder(repo_id)} "
        f"(the cache is HF_HUB_CACHE or HF_HOME/hub){extra}, and set HF_HUB_OFFLINE=1."
    )


def transformers_config(transformers: Any, config: dict[str, Any], owner: str, examples: str) -> Any:
    """A transformers config object from its dict (which names its `model_type`), as a part records it.

    Args:
        transformers: The imported library.
        config: The config as a dict (`to_dict()` of one read from the hub, or written in a YAML config).
        owner: The part it configures, for messages.
        examples: Model types to suggest when it has none.

    Raises:
        CaptionerError: When it names no model type, or one this transformers does not know.
    """
    options = dict(config)
    model_type = options.pop("model_type", None)
    if model_type is None:
        raise CaptionerError(f"The {owner} config has no model_type (e.g. {examples}).")
    try:
        return transformers.AutoConfig.for_model(model_type, **options)
    except (ValueError, KeyError) as error:
        raise CaptionerError(f"transformers does not know the model type {model_type!r} ({error}).") from error
