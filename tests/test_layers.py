"""The house in layers: the one map in the package's docstring, held to the code (no import circle, each layer
importing only its own and lower layers: plain, lazy, type-checking, relative and by-name imports all read) and to
the manual's architecture page (docs/explanation/architecture.md); and the torch-free entry points free of torch."""

import ast
import re
import subprocess
import sys

import captioner
from tests.conftest import TESTS

ROOT = TESTS.parent
LAYER_LINE = re.compile(r"^\s*([a-z_]+(?:, [a-z_]+)*)\s{2,}\S")
ALIAS_TABLES = {"captioner.compat.names"}


def layer_map(text: str) -> list[tuple[str, ...]]:
    """The layer block that follows "Layers, lowest first" in `text`: each line's names, lowest layer first."""
    lines = text[text.index("Layers, lowest first") :].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if LAYER_LINE.match(line))
    layers = []
    for line in lines[start:]:
        match = LAYER_LINE.match(line)
        if not match:
            break
        layers.append(tuple(match.group(1).split(", ")))
    return layers


LAYERS = layer_map(captioner.__doc__)


def module_files() -> dict[str, object]:
    modules = {}
    for path in (ROOT / "captioner").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "callbacks").glob("*.py"):
        modules["captioner.callbacks" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return modules


def imports_of(name: str, path, modules) -> set[str]:
    """Every captioner module a file imports, wherever the import stands (in a function, under TYPE_CHECKING),
    relative imports resolved, and modules named by a string (`importlib.import_module`, a command table)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    # A module that imports by name (`importlib.import_module(...)`) imports every module its strings name; the
    # alias table of older names (compat.names) names today's modules as where old names lead, not as imports.
    by_name = name not in ALIAS_TABLES and any(
        isinstance(node, ast.Attribute) and node.attr == "import_module" for node in ast.walk(tree)
    )
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif by_name and isinstance(node, ast.Constant) and node.value in modules and node.value != "captioner":
            found.add(node.value)
    return {module for module in found if module in modules}


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) - {name} for name, path in modules.items()}


def layer(module: str) -> int:
    room = module.split(".")[1] if module != "captioner" else "captioner"
    for index, group in enumerate(LAYERS):
        if room in group:
            return index
    raise AssertionError(f"{module} is in no layer of the map in captioner/__init__.py")


def test_the_map_names_every_room_once():
    rooms = {
        path.stem if path.suffix == ".py" else path.name
        for path in (ROOT / "captioner").iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").is_file()
    }
    rooms.add("callbacks")
    named = [room for group in LAYERS for room in group]
    assert sorted(named) == sorted(rooms), set(named) ^ rooms
    assert len(named) == len(set(named))


def test_no_module_imports_itself_back_through_any_chain():
    edges, cycles, state = graph(), [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_each_layer_imports_only_its_own_and_lower_layers():
    wrong = [
        f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
        for module, targets in graph().items()
        if module != "captioner"
        for target in targets
        if target != "captioner" and layer(target) > layer(module)
    ]
    assert wrong == []


def test_the_manual_shows_the_same_map():
    page = (ROOT / "docs" / "explanation" / "architecture.md").read_text()
    assert layer_map(page) == LAYERS


def test_a_relative_import_and_an_import_by_name_are_read():
    """The reader sees what plain `from captioner.x import y` would hide (checked on a file written here)."""
    import tempfile
    from pathlib import Path

    modules = {
        "captioner.data.datamodule": None,
        "captioner.features.stores": None,
        "captioner.data": None,
        "captioner.bulk.command": None,
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "stores.py"
        path.write_text(
            "import importlib\nfrom ..data import datamodule\nCOMMANDS = {'x': 'captioner.bulk.command'}\n"
            "def run(name):\n    return importlib.import_module(COMMANDS[name])\n"
        )
        assert imports_of("captioner.features.stores", path, modules) == {
            "captioner.data.datamodule",
            "captioner.bulk.command",
        }


def test_the_package_and_the_exported_runtime_import_no_torch():
    code = (
        "import sys, captioner, captioner.inference.exported, captioner.inference.engine; "
        "assert 'torch' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
