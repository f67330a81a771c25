"""The configs that ship inside the package, found by name (`--config demo`, `--config decoders/transformer`).

In a checkout they are the repository's `configs/` folder; an installed wheel
holds the same files as `captioner/configs/` (mapped in pyproject.toml, not a
second copy). A path that exists always wins over a shipped name.
"""

from __future__ import annotations

from pathlib import Path

from captioner.core.errors import CaptionerError

PACKAGE = Path(__file__).resolve().parent
CONFIG_FLAGS = ("--config", "-c")


def configs_folder() -> Path:
    """Where the shipped configs are: inside the installed package, else the checkout's `configs/`."""
    for folder in (PACKAGE / "configs", PACKAGE.parent / "configs"):
        if (folder / "demo.yaml").is_file():
            return folder
    raise CaptionerError(f"The shipped configs are missing (looked in {PACKAGE / 'configs'} and "
                         f"{PACKAGE.parent / 'configs'}): reinstall captioner.")  # fmt: skip


def shipped_configs() -> dict[str, Path]:
    """Every shipped config by name: `demo`, `decoders/transformer`, ... (the path below the folder, no `.yaml`)."""
    folder = configs_folder()
    return {path.relative_to(folder).with_suffix("").as_posix(): path for path in sorted(folder.rglob("*.yaml"))}


def describe(path: Path) -> str:
    """The first sentence of a config's leading comment: what it is for."""
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line[1:] if line.startswith("#") else None
        if text is None or not text.strip() or text.startswith("   "):  # the comment ends, or a command follows
            break
        words.append(text.strip())
    sentence = " ".join(words).split(": ", 1)[-1] if words and words[0].startswith("Overlay") else " ".join(words)
    return sentence.split(". ")[0].rstrip(".:")


def resolve_config(value: str) -> str:
    """A `--config` value as a path: an existing file as given, else a shipped config of that name.

    Raises:
        CaptionerError: For a name that is neither, listing the shipped ones.
    """
    if Path(value).expanduser().exists() or value.lstrip().startswith("{"):  # a file, or inline YAML/JSON
        return value
    available = shipped_configs()
    name = value.removesuffix(".yaml").removesuffix(".yml").removeprefix("configs/")
    if name in available:
        return str(available[name])
    raise CaptionerError(f"--config {value}: no such file, and no shipped config of that name. Shipped: "
                         f"{', '.join(available)} (python -m captioner configs describes them).")  # fmt: skip


def with_shipped_configs(argv: list[str]) -> list[str]:
    """`argv` with every `--config NAME` (or `--config=NAME`) turned into the path of the file it means."""
    resolved, take_next = [], False
    for argument in argv:
        if take_next:
            resolved.append(resolve_config(argument))
            take_next = False
        elif argument in CONFIG_FLAGS:
            resolved.append(argument)
            take_next = True
        elif argument.startswith("--config="):
            resolved.append("--config=" + resolve_config(argument.split("=", 1)[1]))
        else:
            resolved.append(argument)
    return resolved


def configs_command(argv: list[str]) -> int:
    """`python -m captioner configs`: list the shipped configs, with what each is for."""
    available = shipped_configs()
    width = max(map(len, available))
    print(f"Shipped configs (in {configs_folder()}); use them by name, e.g. --config demo:")
    for name, path in available.items():
        print(f"  {name:<{width}}  {describe(path)}")
    return 0
