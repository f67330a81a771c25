"""What every part chosen by `class_path` in a config shares: its import path, importing it back, and its spec.

Encoders, decoders, objectives and tokenizers are parts: a config names a class
(any importable one, inside this package or not) and its `init_args`; a
checkpoint, an export manifest or prepared data records the same two things
(`spec`) so the part can be rebuilt without the config.

A class path read from a *file* is a different matter from one in a config the
user wrote: importing a module runs its code, and a checkpoint or an exported
folder may come from anyone. So a class named by a file is imported only when
it is captioner's own or lives in a module the user allowed
(`import_trusted_class`): with `--allow_module mypkg` on the command line,
`CAPTIONER_ALLOW_MODULES=mypkg,otherpkg` in the environment, or
`captioner.core.parts.allow_modules("mypkg")` in Python; a training run allows the
modules its own config names.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

from captioner.core.errors import CaptionerError

ALLOW_VARIABLE = "CAPTIONER_ALLOW_MODULES"
BUILT_IN = "captioner"
_allowed: set[str] = set()

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


def allow_modules(*modules: str) -> None:
    """Allow classes in these modules (and their submodules) to be imported when a file names them."""
    _allowed.update(name.strip() for name in modules if name and name.strip())


def allowed_modules() -> set[str]:
    """The modules whose classes a file may name: captioner's own, `allow_modules`' and `$CAPTIONER_ALLOW_MODULES`'."""
    from_environment = os.environ.get(ALLOW_VARIABLE, "").replace(":", ",").split(",")
    return {BUILT_IN, *_allowed, *(name.strip() for name in from_environment if name.strip())}


def _within(path: str, modules: Iterable[str]) -> bool:
    return any(path == module or path.startswith(module + ".") for module in modules)


def import_trusted_class(path: Any, base: type, what: str, source: str, built_in_only: bool = False) -> type:
    """Import a class that a file (checkpoint, manifest, prepared data) names, if it may be imported.

    Args:
        path: The class path read from the file.
        base: The class it must subclass.
        what: What it is, for messages ("decoder").
        source: The file, for messages.
        built_in_only: Only captioner's own classes (the exported runtime's tokenizers), whatever is allowed.

    Raises:
        CaptionerError: Naming the class and how to allow it, when it is not captioner's own nor allowed; or as
            `import_class`.
    """
    if not isinstance(path, str) or "." not in path:
        raise CaptionerError(f"{source} names the {what} class {path!r}, which is not a class path: refused.")
    modules = {BUILT_IN} if built_in_only else allowed_modules()
    if not _within(path, modules):
        package = path.split(".")[0]
        how = (
            "only captioner's own classes are read here"
            if built_in_only
            else f"if you trust it, allow its package: --allow_module {package}, or {ALLOW_VARIABLE}={package}, or "
            f"captioner.core.parts.allow_modules({package!r}) in Python"
        )
        raise CaptionerError(
            f"{source} names the {what} class {path!r}, which is not part of captioner: nothing a "
            f"file names is imported unless allowed ({how})."
        )
    return import_class(path, base, what)


def add_allow_argument(parser: Any) -> None:
    """`--allow_module PACKAGE` (repeatable) on a command that reads class paths from a file."""
    parser.add_argument(
        "--allow_module",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="import classes of this package when the checkpoint or folder names them (your own "
        f"decoder, encoder or tokenizer); also ${ALLOW_VARIABLE}",
    )


def class_paths_in(tree: Any) -> Iterator[str]:
    """Every `class_path` string in a parsed config (nested dicts, lists and namespaces)."""
    if hasattr(tree, "as_dict"):
        tree = tree.as_dict()
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "class_path" and isinstance(value, str):
                yield value
            else:
                yield from class_paths_in(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from class_paths_in(value)


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
