"""What every part chosen by `class_path` in a config shares: its import path, importing it back, and its spec.

Encoders, decoders and objectives are parts: a config names a class (any
importable one, inside this package or not) and its `init_args`; a checkpoint
records the same two things (`spec`) so the part can be rebuilt without the
config.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

from captioner.errors import CaptionerError

# Random initialisation is seeded so that `pretrained: false` (or `weights: null`) gives the same network in
# extraction, in training and when a checkpoint is loaded.
RANDOM_INIT_SEED = 0


def class_path(cls: type) -> str:
    """The import path of a class, as configs write it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str, base: type, what: str) -> type:
    """Import `path` (module.Class) and check it is a subclass of `base`.

    Raises:
        CaptionerError: When it cannot be imported or is not a `base`.
    """
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise CaptionerError(
            f"The {what} class {path!r} cannot be imported ({error}). Make its module importable (installed, or "
            "on PYTHONPATH) before loading."
        ) from error
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise CaptionerError(f"{path!r} is not a {base.__name__} subclass.")
    return cls


def config_class(value: Any, base: type, what: str) -> type:
    """The class a config value names: a class, a `functools.partial` of one, an instance, a `class_path` string,
    or a dict or namespace with `class_path` (what config links receive)."""
    if isinstance(value, type):
        return value
    if isinstance(value, str):
        return import_class(value, base, what)
    if isinstance(value, dict) or hasattr(value, "class_path"):
        path = value["class_path"] if isinstance(value, dict) else value.class_path
        return import_class(path, base, what)
    if hasattr(value, "func"):  # functools.partial(cls, ...)
        return next((a for a in (value.func, *value.args) if isinstance(a, type)), value.func)
    return type(value)


def config_init_args(value: Any) -> dict[str, Any]:
    """The `init_args` of a config value (dict or namespace), as a plain dict."""
    init_args = value.get("init_args") if isinstance(value, dict) else getattr(value, "init_args", None)
    if init_args is None:
        return {}
    return dict(init_args.as_dict() if hasattr(init_args, "as_dict") else init_args)


@contextlib.contextmanager
def seeded_initialisation(seed: int = RANDOM_INIT_SEED) -> Iterator[None]:
    """Build modules with a fixed seed without touching the caller's random state."""
    import torch  # here only: parts are also read where torch is not installed (the exported runtime)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def require_library(module: str, extra: str, what: str) -> Any:
    """Import an optional library, or stop with one line naming the extra that installs it.

    Raises:
        CaptionerError: When it is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise CaptionerError(
            f"{what} needs the {module.split('.')[0]} package, which is not installed ({error}): "
            f"pip install 'captioner[{extra}]'."
        ) from None
