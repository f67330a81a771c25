"""What every part chosen by `class_path` in a config shares: its import path, importing it back, and its spec.

Encoders, decoders and objectives are parts: a config names a class (any
importable one, inside this package or not) and its `init_args`; a checkpoint
records the same two things (`spec`) so the part can be rebuilt without the
config.
"""

from __future__ import annotations

import importlib
from typing import Any

from captioner.errors import CaptionerError


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
