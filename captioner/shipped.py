"""The configs that ship inside the package, found by name (`--config demo`, `--config decoders/transformer`).

In a checkout they are the repository's `configs/` folder; an installed wheel
holds the same files as `captioner/configs/` (mapped in pyproject.toml, not a
second copy). A path that exists always wins over a shipped name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from captioner.core.errors import CaptionerError

PACKAGE = Path(__file__).resolve().parent
CONFIG_FLAGS = ("--config", "-c")


def configs_folder() -> Path:
    """Where the shipped configs are: inside the installed package, else the checkout's `configs/`."""
    for folder in (PACKAGE / "configs", PACKAGE.parent / "configs"):
        if (folder / "demo.yaml").is_file():
            return folder
    raise CaptionerError(
        f"The shipped configs are missing (looked in {PACKAGE / 'configs'} and "
        f"{PACKAGE.parent / 'configs'}): reinstall captioner."
    )


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
    # Inline YAML or JSON as it is: a config this function expanded earlier is passed on as text, and a run of
    # several processes starts the others with that command line.
    if "\n" in value or value.lstrip().startswith("{") or Path(value).expanduser().exists():
        return value
    available = shipped_configs()
    name = value.removesuffix(".yaml").removesuffix(".yml").removeprefix("configs/")
    if name in available:
        return str(available[name])
    raise CaptionerError(
        f"--config {value}: no such file, and no shipped config of that name. Shipped: "
        f"{', '.join(available)} (python -m captioner configs describes them)."
    )


def with_shipped_configs(argv: list[str]) -> list[str]:
    """`argv` with every `--config NAME` (or `--config=NAME`) turned into what LightningCLI reads: the file it
    means, preceded by what it `extends`, its older captioner keys rewritten (`captioner.compat.configs`), and the
    run named after the configs' `run_name`s joined (unless the command line names it).

    Two keys are captioner's own, read here and left out of what LightningCLI sees:

    - `extends: NAME` (a shipped config's name or a path, relative to the config): that config first, then this
      one over it (`default` and `demo` extend `base`: the trainer and callbacks are written once);
    - `run_name: NAME`: this config's part of the run's name; overlays compose (`default` + `decoders/transformer`
      + `objectives/scst` names the run `transformer-scst`).
    """
    out: list[str] = []
    names: list[str] = []
    take_next = False
    for argument in argv:
        if take_next:
            out += _expanded(argument, names, flag=out.pop())
            take_next = False
        elif argument in CONFIG_FLAGS:
            out.append(argument)
            take_next = True
        elif argument.startswith("--config="):
            out += _expanded(argument.split("=", 1)[1], names, flag="--config")
        else:
            out.append(argument)
    named = any(a.startswith(("--trainer.logger.init_args.name", "--trainer.logger.name")) for a in argv)
    if names and not named:
        out += ["--trainer.logger.init_args.name", "-".join(names)]
    return out


def _expanded(value: str, names: list[str], flag: str, seen: tuple[str, ...] = ()) -> list[str]:
    """`flag value` for one config, what it extends first; its `run_name` added to `names`."""
    import yaml

    from captioner.compat.configs import upgraded_config

    path = Path(resolve_config(value))
    if not path.is_file():
        return [flag, value]  # inline YAML: as it is
    if str(path.resolve()) in seen:
        raise CaptionerError(f"{path} extends itself (through {', '.join(seen)}).")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return [flag, str(path)]  # LightningCLI says what is wrong with it
    if not isinstance(tree, dict):
        return [flag, str(path)]
    tree, changed = upgraded_config(tree)
    out: list[str] = []
    base = tree.pop("extends", None)
    if base is not None:
        relative = path.parent / str(base)
        target = next((str(c) for c in (relative, relative.with_suffix(".yaml")) if c.is_file()), str(base))
        out += _expanded(target, names, flag, (*seen, str(path.resolve())))  # else a shipped config's name
    name = tree.pop("run_name", None)
    if name:
        names.append(str(name))
    if base is None and name is None and not changed:
        return [*out, flag, str(path)]
    return [*out, flag, yaml.safe_dump(tree, sort_keys=False)]


def configs_parser() -> argparse.ArgumentParser:
    """The options of `python -m captioner configs` (none but --help)."""
    return argparse.ArgumentParser(prog="python -m captioner configs", description="List the shipped configs.")


def configs_command(argv: list[str]) -> int:
    """`python -m captioner configs`: list the shipped configs, with what each is for."""
    configs_parser().parse_args(argv)
    available = shipped_configs()
    width = max(map(len, available))
    print(f"Shipped configs (in {configs_folder()}); use them by name, e.g. --config demo:")
    for name, path in available.items():
        print(f"  {name:<{width}}  {describe(path)}")
    return 0
