"""The house in layers: no import circle (lazy and type-checking imports included), each layer importing only those
below it, and the torch-free entry points free of torch."""

import ast
import subprocess
import sys

from tests.conftest import TESTS

ROOT = TESTS.parent
# Lowest first. A module may import its own layer's modules and those of lower layers, never a higher layer's.
LAYERS = [
    ("captioner.core", "captioner.compat.names"),
    ("captioner.text", "captioner.decoding", "captioner.jobs"),
    ("captioner.encoders",),
    ("captioner.compat",),
    ("captioner.features", "captioner.data", "captioner.evaluation"),
    ("captioner.models",),
    ("captioner",),  # the applications: inference, runtime, export, serve, bulk, cli, callbacks, ...
]


def module_files() -> dict[str, object]:
    modules = {}
    for path in (ROOT / "captioner").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "callbacks").glob("*.py"):
        modules["captioner.callbacks" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return modules


def imports_of(path, modules) -> set[str]:
    """Every captioner module a file imports, wherever the import stands (in a function, under TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in modules}


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def layer(module: str) -> int:
    best = max((prefix for group in LAYERS for prefix in group if module == prefix or module.startswith(prefix + ".")),
               key=len)  # fmt: skip
    return next(index for index, group in enumerate(LAYERS) if best in group)


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
    wrong = [f"{module} ({layer(module)}) imports {target} ({layer(target)})"
             for module, targets in graph().items() for target in targets
             if target != "captioner" and layer(target) > layer(module)]  # fmt: skip
    assert wrong == []


def test_the_package_and_the_exported_runtime_import_no_torch():
    code = ("import sys, captioner, captioner.inference.exported, captioner.inference.engine; "
            "assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
