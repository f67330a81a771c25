"""The manual's generated reference: MkDocs calls `on_page_markdown` for every page, and each marker
`<!-- reference: NAME -->` is replaced by what the code says today (so the reference cannot drift from it):

- `commands`: every command's options, from its parser (`captioner.cli.command_parser`, LightningCLI's for `fit`);
- `config`: `fit`'s config keys, from LightningCLI's schema, and the shipped configs;
- `decoding`: `DecodingConfig`'s settings with their bounds (`captioner.decoding.config.reference_table`);
- `rows`: every output's row schema;
- `changelog`: CHANGELOG.md.

`tests/test_docs.py` calls the same functions and checks that every option and setting is in them.
"""

from __future__ import annotations

import argparse
import html
import re
from functools import cache
from typing import Any

MARKER = re.compile(r"<!-- reference: ([a-z]+) -->")


def _cell(text: Any) -> str:
    """Table-safe text: one line, pipes escaped, and `<...>` outside code spans escaped (help text says
    caption_<style>, which HTML would read as a tag)."""
    parts = " ".join(str(text).split()).split("`")
    escaped = [part if index % 2 else html.escape(part, quote=False) for index, part in enumerate(parts)]
    return "`".join(escaped).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    default = action.default
    if default in (None, argparse.SUPPRESS) or isinstance(default, dict) or action.option_strings == []:
        return ""
    if isinstance(default, bool) and action.nargs == 0:
        return ""
    return f"`{default!r}`" if not isinstance(default, str) else f"`{default}`"


def option_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str]]:
    """A parser's options as (names, default, help), help and groups of help actions left out."""
    rows = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        names = ", ".join(f"`{name}`" for name in action.option_strings) or f"`{action.dest}` (positional)"
        rows.append((names, _default(action), _cell(action.help or "")))
    return rows


def _table(rows: list[tuple[str, str, str]], header: tuple[str, str, str]) -> str:
    lines = [f"| {' | '.join(header)} |", "|---|---|---|"]
    lines += [f"| {name} | {default} | {text} |" for name, default, text in rows]
    return "\n".join(lines)


@cache
def fit_parser() -> argparse.ArgumentParser:
    """LightningCLI's parser of `fit`, built as `python -m captioner fit` builds it, without parsing anything."""
    from captioner.cli import CaptionerCLI
    from captioner.data.datamodule import CaptionDataModule
    from captioner.models.module import CaptionModel

    built: dict[str, Any] = {}

    class _BuiltError(Exception):  # raised once the parser exists: nothing is parsed or run
        pass

    class Schema(CaptionerCLI):
        def parse_arguments(self, parser, args):
            built["parser"] = parser
            raise _BuiltError

    try:
        Schema(CaptionModel, CaptionDataModule, args=["fit"], auto_configure_optimizers=False)
    except _BuiltError:
        pass
    return built["parser"]._subcommands_action._name_parser_map["fit"]


def config_keys() -> list[tuple[str, str, str]]:
    """`fit`'s config keys: (key, default, help), the config-file and class-help entries left out."""
    rows = []
    for action in fit_parser()._actions:
        name = type(action).__name__
        if action.dest in ("help", "config", "print_config") or name in ("_ActionConfigLoad", "_ActionHelpClassPath"):
            continue
        if action.dest.endswith(".help") or not action.option_strings:
            continue
        linked = " (set from the model: `--model.*`)" if name == "ActionLink" else ""
        rows.append((f"`{action.dest}`", _default(action), _cell((action.help or "") + linked)))
    return rows


def commands() -> str:
    """Every command, its options."""
    from captioner.cli import COMMANDS, LIGHTNING_COMMANDS, command_parser

    parts = [
        "Training and evaluation (`fit`, `validate`, `test`, `predict`) are LightningCLI's: they take `--config FILE` "
        "(a path, or a shipped config's name) and every key of [the configuration](configuration.md) as an option "
        "(`--model.lr 3e-4`, `--data.loading.batch_size 64`, `--trainer.max_epochs 20`), plus `--ckpt_path`.",
        "",
    ]
    parts += [f"- `{name}`: {about}" for name, about in LIGHTNING_COMMANDS.items()]
    for name, (_, _, about) in COMMANDS.items():
        parser = command_parser(name)
        usage = ["```text", parser.format_usage().strip(), "```"]
        parts += ["", f"## `{name}`", "", f"{about[0].upper()}{about[1:]}.", "", *usage, ""]
        parts.append(_table(option_rows(parser), ("option", "default", "what it does")))
    return "\n".join(parts)


def configuration() -> str:
    """`fit`'s keys and the shipped configs."""
    from captioner.shipped import describe, shipped_configs

    parts = ["## Shipped configs", "", "| name | what it is for |", "|---|---|"]
    parts += [f"| `{name}` | {_cell(describe(path))} |" for name, path in shipped_configs().items()]
    parts += ["", "## Every key", "", _table(config_keys(), ("key", "default", "what it does"))]
    return "\n".join(parts)


def decoding() -> str:
    from captioner.decoding.config import reference_table

    return reference_table()


ROW_HELP = {
    "image": "the image: its path as given, `<shard>#<member>` inside a shard, `<Image #3>` for one in memory",
    "caption": "the best caption; null when the image could not be read",
    "score": "its log-probability under the model (the search's rules applied)",
    "confidence": "the calibrated probability that the caption is good (models fitted with a calibrator), else null",
    "alternatives": "with `num_return` > 1: the ranked captions, best first (`caption`, `score`, and where they "
    "apply `constraints_met`, `clip_score`), else null",
    "constraints_met": "with `force_words`: whether the caption holds every forced word, else null",
    "clip_score": "with a CLIP reranker: the caption's CLIP-S, else null",
    "error": "why the image has no caption, else null",
}


def rows() -> str:
    """The row every output shares, and what each output adds."""
    from captioner.bulk.outputs import STYLE_COLUMN
    from captioner.decoding.answers import ROW_FIELDS

    missing = set(ROW_FIELDS) - set(ROW_HELP)
    if missing:
        raise ValueError(f"row fields without a description in docs/hooks.py: {sorted(missing)}")
    parts = ["| field | what it holds |", "|---|---|"]
    parts += [f"| `{name}` | {ROW_HELP[name]} |" for name in ROW_FIELDS]
    parts += [
        "",
        "| output | its rows |",
        "|---|---|",
        "| `caption --json` | one row per file, as above |",
        "| `predict` (`predictions.jsonl`, `predictions.csv`) | one row per image of `--data.predict_dir` |",
        "| `POST /predict` | the row, with `time_ms` (`decode`, `model`, `total`, `batch_size`) and, asked for, "
        "`attention` |",
        f"| `caption-set` (JSON Lines, Parquet, shards' `.json`) | the row; with `--styles`, a `{STYLE_COLUMN}<style>` "
        "column per style |",
        "| `POST /v1/chat/completions` | a `chat.completion`: the caption (and with `n`, the ranked ones) as choices |",
    ]
    return "\n".join(parts)


def changelog() -> str:
    """CHANGELOG.md, the file at the repository's top, as the site's page."""
    from pathlib import Path

    return (Path(__file__).parent.parent / "CHANGELOG.md").read_text(encoding="utf-8")


GENERATORS = {
    "commands": commands,
    "config": configuration,
    "decoding": decoding,
    "rows": rows,
    "changelog": changelog,
}


def on_page_markdown(markdown: str, page: Any = None, config: Any = None, files: Any = None) -> str:
    """MkDocs' hook: the markers replaced by the reference they name."""
    return MARKER.sub(lambda found: GENERATORS[found.group(1)](), markdown)
