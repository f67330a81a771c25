"""Names of older captioner versions that keep working, each with one deprecation line.

- Modules that moved: `captioner.errors`, `captioner.files`, `captioner.parts`,
  `captioner.pixels`, `captioner.hardware` (the foundations, now in
  `captioner.core`), `captioner.checkpointing` (now `captioner.models.checkpoints`,
  as configs name `captioner.checkpointing.AtomicCheckpointIO`), `captioner.metrics`,
  `captioner.cider`, `captioner.evaluation`'s functions (now `captioner.evaluation.*`),
  `captioner.quantization`, `captioner.encoders.hub`, `captioner.models.search`, and the Python API's 0.3 modules
  `captioner.runtime`, `captioner.predictions` and `captioner.captioners` (now in `captioner.inference`).
- Configs that say `callbacks.CaptionWriter` (captioner 0.2 installed its
  callbacks as a top-level package, `callbacks`; they are `captioner.callbacks` now).

Both are import finders consulted after every other one, so they answer only
for a name nothing else provides (an unrelated `callbacks` package keeps its name).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

from captioner.core.errors import CaptionerError

OLD_CALLBACKS, NEW_CALLBACKS = "callbacks", "captioner.callbacks"
MOVED_MODULES = {
    "captioner.errors": "captioner.core.errors",
    "captioner.files": "captioner.core.files",
    "captioner.parts": "captioner.core.parts",
    "captioner.pixels": "captioner.core.pixels",
    "captioner.hardware": "captioner.core.hardware",
    "captioner.encoders.hub": "captioner.core.hub",
    "captioner.checkpointing": "captioner.models.checkpoints",
    "captioner.metrics": "captioner.evaluation.metrics",
    "captioner.cider": "captioner.evaluation.cider",
    "captioner.quantization": "captioner.export.quantization",
    "captioner.models.search": "captioner.models.stepping",
    "captioner.runtime": "captioner.inference.exported",
    "captioner.predictions": "captioner.inference.protocol",
    "captioner.captioners": "captioner.inference.loading",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the target module is already executed


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds old module names as their new ones, saying so once per name."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def target(self, fullname: str) -> str | None:
        raise NotImplementedError

    def note(self, fullname: str, new: str) -> str | None:
        """The deprecation line for this name (None: already said)."""
        if fullname in self.warned:
            return None
        self.warned.add(fullname)
        return f"captioner: '{fullname}' is deprecated; it is '{new}' now (it works for now)."

    def find_spec(self, fullname: str, path=None, target=None):
        new = self.target(fullname)
        if new is None:
            return None
        line = self.note(fullname, new)
        if line:
            print(line, file=sys.stderr)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


class MovedModulesFinder(_AliasFinder):
    """`captioner.errors` and the other moved modules, as their new modules."""

    def target(self, fullname: str) -> str | None:
        return MOVED_MODULES.get(fullname)


class OldCallbacksFinder(_AliasFinder):
    """`callbacks` and `callbacks.X` as `captioner.callbacks[.X]`."""

    def target(self, fullname: str) -> str | None:
        if fullname != OLD_CALLBACKS and not fullname.startswith(OLD_CALLBACKS + "."):
            return None
        return NEW_CALLBACKS + fullname[len(OLD_CALLBACKS) :]

    def note(self, fullname: str, new: str) -> str | None:
        if self.warned:  # one line for the package and all its modules
            return None
        self.warned.add(OLD_CALLBACKS)
        return (
            f"captioner: '{OLD_CALLBACKS}.…' in a config is deprecated; write '{NEW_CALLBACKS}.…' (it works for now)."
        )


def _append(finder_type: type) -> None:
    if not any(isinstance(finder, finder_type) for finder in sys.meta_path):
        sys.meta_path.append(finder_type())


def install_moved_modules() -> None:
    """Make the old module names importable (once; `import captioner` does it)."""
    _append(MovedModulesFinder)


def install() -> None:
    """Make captioner 0.2's `callbacks.X` names importable too (once; the command line does it)."""
    install_moved_modules()
    _append(OldCallbacksFinder)


# ---------------------------------------------------------------- decoding settings' old names
# Old option names, and what they are called now.
RENAMED = {"beam_size": "num_beams", "max_decode_length": "max_length", "beams": "num_return"}
_warned: set[str] = set()


def upgraded(settings: dict[str, Any], source: str, quiet: bool = False) -> dict[str, Any]:
    """Settings with old names replaced by new ones; one deprecation line per old name (unless `quiet`).

    Raises:
        CaptionerError: When an old and a new name are both given, differently.
    """
    settings = dict(settings)
    for old, new in RENAMED.items():
        if old not in settings:
            continue
        value = settings.pop(old)
        if value is None:
            continue
        if settings.get(new) is not None and settings[new] != value:
            raise CaptionerError(
                f"{source}: both {old}={value!r} and {new}={settings[new]!r}; {old} is the old name "
                f"of {new}, give only {new}."
            )
        settings[new] = value
        if not quiet and old not in _warned:
            _warned.add(old)
            print(f"captioner: '{old}' is deprecated; it is '{new}' now (it works for now).", file=sys.stderr)
    return settings


# A server request of captioner 0.2 asked for ranked alternatives with `beams` (0: the best only).
OLD_REQUEST_FIELDS = ("beams",)


def upgraded_request(fields: dict[str, Any]) -> dict[str, Any]:
    """A request's fields with 0.2's `beams` read as `num_return` (when `num_return` is not given)."""
    fields = dict(fields)
    beams = fields.pop("beams", None)
    if fields.get("num_return") in (None, "") and beams not in (None, ""):
        fields["num_return"] = beams
    return fields
