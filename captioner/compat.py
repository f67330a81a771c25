"""Names of older captioner versions that keep working: configs that say `callbacks.CaptionWriter` (captioner 0.2
installed its callbacks as a top-level package, `callbacks`; they are `captioner.callbacks` now).

`install()` adds an import finder consulted after every other one, so it answers only when no real `callbacks`
package is installed (an unrelated project of that name keeps its name), and prints one deprecation line.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

OLD, NEW = "callbacks", "captioner.callbacks"


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the target module is already executed


class OldCallbacksFinder(importlib.abc.MetaPathFinder):
    """Finds `callbacks` and `callbacks.X` as `captioner.callbacks[.X]`, saying so once."""

    warned = False

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != OLD and not fullname.startswith(OLD + "."):
            return None
        if not OldCallbacksFinder.warned:
            OldCallbacksFinder.warned = True
            print(f"captioner: '{OLD}.…' in a config is deprecated; write '{NEW}.…' (it works for now).",
                  file=sys.stderr)  # fmt: skip
        target = NEW + fullname[len(OLD) :]
        return importlib.util.spec_from_loader(fullname, _AliasLoader(target))


def install() -> None:
    """Make the old names importable (once)."""
    if not any(isinstance(finder, OldCallbacksFinder) for finder in sys.meta_path):
        sys.meta_path.append(OldCallbacksFinder())
