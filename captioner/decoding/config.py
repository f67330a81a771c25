"""How captions are decoded, as one typed, saved object (torch-free: the exported runtime reads it too).

A `DecodingConfig` travels in every checkpoint and export manifest and can be
overridden from the command line (`--model.decoding.num_beams 5`), the Python
API (`Captioner(..., decoding=...)`, `caption(images, num_beams=5)`), the
`caption` command and each server request. Its rules (`captioner.decoding.rules`)
and its search (`captioner.decoding.search`) are the same code in PyTorch and in
the NumPy runtime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from captioner.compat.names import RENAMED, upgraded
from captioner.core.errors import CaptionerError
from captioner.text.styles import style_of


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids search needs: where to start, when to stop, what never to emit."""

    start: int
    end: int
    pad: int
    banned: tuple[int, ...]

    @classmethod
    def of(cls, vocabulary: Any) -> SpecialTokens:
        """From a tokenizer (`captioner.text`): its `banned` tokens (padding, start, unknown) are never generated."""
        return cls(vocabulary.start_index, vocabulary.end_index, vocabulary.pad_index, tuple(vocabulary.banned))


@dataclass(frozen=True)
class ModelLimits:
    """What a model can decode: the bounds a `DecodingConfig` is checked against before the model runs.

    Attributes:
        vocab_size: Tokens the decoder scores, specials included.
        default_max_words: The tokenizer's longest caption (what `max_length: null` means).
        longest_caption: The most words the decoder can write step by step (its position table, a language
            model's context), None when it has no limit.
        decoder: The decoder's name, for messages.
        word_ids: The ids of words that are single tokens (`bad_endings` name words).
        tokenizer: The tokenizer (`prefix`, `force_words` and `bad_words` are written with it), if known.
    """

    vocab_size: int
    default_max_words: int
    longest_caption: int | None = None
    decoder: str = "the decoder"
    word_ids: Mapping[str, int] | None = None
    tokenizer: Any = None

    @property
    def styles(self) -> tuple[str, ...]:
        """The caption styles the model was trained on, the default first (none for a model of one style)."""
        return tuple(getattr(self.tokenizer, "styles", ()) or ())


# The most a single server request may ask for, whatever the model could do (a request's work is bounded).
MAX_BEAMS = 10
MAX_REQUEST_WORDS = 100


@dataclass(frozen=True)
class Setting:
    """One decoding setting, declared once: what it means, its kind, its bounds, and the range a server request may
    ask for. `DecodingConfig` checks the bounds, and the command-line options (`add_arguments`), the server's request
    parsing (`request_ranges`) and the reference table (`reference_table`) are made from these declarations.

    Attributes:
        help: What it does (one or two sentences).
        kind: "int", "float", "bool", "words" (single words), "phrase" (some words), "phrases" (phrases, an entry
            of alternatives allowed) or "stopping" (true, false or "never").
        low: The least value (None: unbounded), included unless `above`.
        high: The greatest value (None: unbounded).
        above: `low` itself is not allowed.
        request: The range a request may ask for: `(low, high)`, where high may be "longest" (the most words the
            model writes) or "vocabulary" (its number of tokens); None for a setting that is not a number.
    """

    help: str
    kind: str
    low: float | None = None
    high: float | None = None
    above: bool = False
    request: tuple[float, float | str] | None = None

    def bounds(self) -> str:
        """The allowed values, for messages and the reference ("at least 1", "in (0, 1]")."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.above else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"over {self.low:g}" if self.above else f"at least {self.low:g}"
        return "any" if self.kind in ("int", "float") else ""

    def allows(self, value: Any) -> bool:
        if value is None or self.kind not in ("int", "float"):
            return True
        if self.low is not None and (value < self.low or (self.above and value == self.low)):
            return False
        return self.high is None or value <= self.high


def setting(default: Any, help: str, kind: str, **bounds: Any) -> Any:
    """A `DecodingConfig` field declared with its `Setting`."""
    return field(default=default, metadata={"setting": Setting(help, kind, **bounds)})


@dataclass(frozen=True)
class DecodingConfig:
    """Every setting of caption decoding (Hugging Face's `GenerationConfig`, for captions): the settings are listed
    below from their declarations (`Setting`), with their bounds."""

    num_beams: int = setting(
        3,
        "Live hypotheses per image (1: greedy decoding, or sampling with do_sample).",
        "int",
        low=1,
        request=(1, MAX_BEAMS),
    )
    num_return: int = setting(
        1,
        "Ranked captions returned per image (at most num_beams; 1: the best only).",
        "int",
        low=1,
        request=(0, MAX_BEAMS),
    )
    length_penalty: float = setting(
        0.0,
        "GNMT alpha for ranking finished captions, score / ((5 + length) / 6) ** alpha (0: raw "
        "log-probability; > 0 favours longer captions).",
        "float",
        request=(-5, 5),
    )
    max_length: int | None = setting(
        None, "Most words per caption (None: the tokenizer's longest caption).", "int", low=1, request=(1, "longest")
    )
    min_length: int = setting(0, "`<end>` is not allowed before this many words.", "int", low=0, request=(0, "longest"))
    no_repeat_ngram_size: int = setting(
        0, "No n-gram of this size appears twice in a caption (0: off).", "int", low=0, request=(0, 10)
    )
    bad_endings: tuple[str, ...] = setting(
        (), "Words a caption may not end on (a, with, ...): `<end>` is not allowed right after them.", "words"
    )
    prefix: str | None = setting(
        None, "Every caption starts with these words (a trigger word, 'a photo of'), forced token by token.", "phrase"
    )
    force_words: tuple[str | tuple[str, ...], ...] = setting(
        (),
        "Words or phrases every caption must hold, each entry a phrase ('red', 'on the left') or a list of phrases "
        "any one of which will do (['circle', 'square']); searched for with constrained beam search (beams kept for "
        "every level of progress through the constraints). A caption that cannot meet them within max_length is "
        "returned anyway, best first, marked as not meeting them.",
        "phrases",
    )
    bad_words: tuple[str, ...] = setting(
        (), "Words or phrases no caption may hold (the last token of a phrase is refused after the others).", "phrases"
    )
    style: str | None = setting(
        None,
        "The caption style, for a model trained on captions of several (short, long, tags; captioner.text.styles): "
        "its marker is forced as the first token and left out of the caption (None: the model's default style).",
        "phrase",
    )
    early_stopping: bool | Literal["never"] = setting(
        False,
        "When an image's beam search stops, once it has num_beams finished captions: at once (true); when no "
        "live hypothesis beats the worst of them at its current length (false: Hugging Face's heuristic, exact "
        "without a length penalty); or only when none could at any length up to max_length (never: exact with any "
        "length penalty, slower).",
        "stopping",
    )
    num_beam_groups: int = setting(
        1,
        "Diverse beam search (Vijayakumar et al.): beams split into this many groups, each group penalised for "
        "the words the earlier groups chose at the same step (a divisor of num_beams).",
        "int",
        low=1,
        request=(1, MAX_BEAMS),
    )
    diversity_penalty: float = setting(
        0.0,
        "The penalty per earlier choice of the same word (with num_beam_groups > 1).",
        "float",
        low=0,
        request=(0, 100),
    )
    do_sample: bool = setting(
        False, "Draw each word from the model's distribution instead of searching (with num_beams 1).", "bool"
    )
    temperature: float = setting(
        1.0, "Divide the scores by this before sampling.", "float", low=0, above=True, request=(0.01, 100)
    )
    top_k: int = setting(
        0, "Sample from the k most likely words only (0: all).", "int", low=0, request=(0, "vocabulary")
    )
    top_p: float = setting(
        1.0,
        "Sample from the smallest set of words whose probability reaches p (nucleus sampling; 1: all).",
        "float",
        low=0,
        high=1,
        above=True,
        request=(0, 1),
    )
    seed: int | None = setting(
        None, "Seed of sampling (None: fresh entropy every call).", "int", low=0, request=(0, 2**63 - 1)
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "bad_endings", tuple(self.bad_endings))
        object.__setattr__(self, "bad_words", tuple(self.bad_words))
        object.__setattr__(
            self, "force_words", tuple(entry if isinstance(entry, str) else tuple(entry) for entry in self.force_words)
        )
        problems = [
            f"{name}={getattr(self, name)!r} ({declared.bounds()})"
            for name, declared in settings().items()
            if not declared.allows(getattr(self, name))
        ]
        if not 1 <= self.num_return <= max(self.num_beams, 1):
            problems.append(f"num_return={self.num_return} (1 to num_beams={self.num_beams})")
        if self.num_beam_groups >= 1 and self.num_beams % self.num_beam_groups:
            problems.append(f"num_beam_groups={self.num_beam_groups} (a divisor of num_beams={self.num_beams})")
        if self.do_sample and self.num_beams != 1:
            problems.append("do_sample with num_beams > 1 (sampling draws one caption per image)")
        if self.early_stopping not in (True, False, "never"):
            problems.append(f"early_stopping={self.early_stopping!r} (true, false or never)")
        phrases = [*self.bad_words, *(p for e in self.force_words for p in ([e] if isinstance(e, str) else e))]
        if not all(isinstance(phrase, str) and phrase.strip() for phrase in phrases) or (
            self.prefix is not None and not self.prefix.strip()
        ):
            problems.append("prefix, force_words and bad_words hold words (no empty ones)")
        if self.force_words and (self.do_sample or self.num_beam_groups > 1):
            problems.append("force_words with sampling or diverse groups (constrained beam search only)")
        if problems:
            raise CaptionerError("Decoding settings out of range: " + "; ".join(problems) + ".")

    # ------------------------------------------------------------ saved and overridden
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, stored in checkpoints and export manifests."""
        return {
            **dataclasses.asdict(self),
            "bad_endings": list(self.bad_endings),
            "bad_words": list(self.bad_words),
            "force_words": [e if isinstance(e, str) else list(e) for e in self.force_words],
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any] | None, source: str = "decoding settings") -> DecodingConfig:
        """Rebuild from `to_dict` (or a captioner 0.2 dict with `beam_size` / `max_decode_length`).

        Raises:
            CaptionerError: Naming an unknown setting.
        """
        return cls().with_overrides(**upgraded(dict(payload or {}), source, quiet=True))

    def with_overrides(self, **overrides: Any) -> DecodingConfig:
        """A copy with the given settings changed (None leaves a setting as it is; old names work, with a note).
        Asking for sampling without a number of beams samples one caption per image (`num_beams` 1); asking for more
        alternatives than beams searches with as many beams as alternatives.

        Raises:
            CaptionerError: Naming an unknown setting, or one out of range.
        """
        changes = {name: value for name, value in upgraded(overrides, "decoding").items() if value is not None}
        if changes.get("do_sample") and "num_beams" not in changes:  # sampling draws one caption: no beams
            changes.update(num_beams=1, num_return=1, num_beam_groups=1)
        if "num_return" in changes and "num_beams" not in changes:  # N alternatives need N beams at least
            changes["num_beams"] = max(self.num_beams, changes["num_return"])
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise CaptionerError(
                f"Unknown decoding setting(s) {', '.join(unknown)}: choose from {', '.join(sorted(known))}."
            )
        return dataclasses.replace(self, **changes)

    def greedy(self) -> DecodingConfig:
        """These settings, the best word at each step (validation decodes so: fast, and comparable across runs;
        without `force_words`, which need a beam search)."""
        return dataclasses.replace(self, num_beams=1, num_return=1, do_sample=False, num_beam_groups=1, force_words=())

    @property
    def constrained(self) -> bool:
        """Whether captions must hold forced words (the constrained search runs)."""
        return bool(self.force_words)

    def max_words(self, vocabulary_max_length: int) -> int:
        """The most words a caption may have."""
        return self.max_length or vocabulary_max_length

    def checked(self, limits: ModelLimits) -> DecodingConfig:
        """These settings, checked against the model they will run on (before it runs).

        Raises:
            CaptionerError: Naming every setting the model cannot honour, and its limit.
        """
        problems = []
        words = self.max_words(limits.default_max_words)
        longest = limits.longest_caption
        if longest is not None and words > longest:
            what = f"max_length={self.max_length}" if self.max_length else f"the tokenizer's max_length={words}"
            problems.append(
                f"{what}: {limits.decoder} writes at most {longest} words (its positions); use "
                f"max_length {longest} or less"
            )
        if self.min_length > words:
            problems.append(f"min_length={self.min_length} is over the {words} words a caption may have")
        if self.top_k > limits.vocab_size:
            problems.append(f"top_k={self.top_k} is over the model's {limits.vocab_size} tokens")
        if self.bad_endings and limits.word_ids is not None:
            unknown = [word for word in self.bad_endings if word not in limits.word_ids]
            if unknown:
                problems.append(
                    f"bad_endings {', '.join(map(repr, unknown))} are not single tokens of this model's "
                    "tokenizer, so it could never end on them as words"
                )
        problems += self._phrase_problems(limits.tokenizer, words)
        if self.style is not None and limits.tokenizer is not None:
            try:
                style_of(self.style, limits.styles)
            except CaptionerError as error:
                problems.append(str(error).rstrip("."))
        if problems:
            raise CaptionerError("Decoding settings this model cannot run: " + "; ".join(problems) + ".")
        return self

    def _phrase_problems(self, tokenizer: Any, words: int) -> list[str]:
        """What the model's tokenizer cannot write of `prefix`, `force_words` and `bad_words`."""
        if tokenizer is None:
            return []
        unknown = getattr(tokenizer, "unk_index", None)
        phrases = [*self.bad_words, *(p for e in self.force_words for p in ([e] if isinstance(e, str) else e))]
        unwritable = [
            phrase
            for phrase in phrases + ([self.prefix] if self.prefix else [])
            if not tokenizer.phrase_tokens(phrase) or any(unknown in form for form in tokenizer.phrase_tokens(phrase))
        ]
        problems = []
        if unwritable:
            problems.append(f"{', '.join(map(repr, unwritable))}: not in this model's vocabulary")
        if self.prefix and not unwritable and len(tokenizer.prefix_tokens(self.prefix)) > words:
            problems.append(f"prefix {self.prefix!r} is longer than the {words} tokens a caption may have")
        return problems


def settings() -> dict[str, Setting]:
    """Every decoding setting's declaration, in order."""
    return {item.name: item.metadata["setting"] for item in dataclasses.fields(DecodingConfig)}


def request_ranges(limits: ModelLimits) -> dict[str, tuple[str, float | None, float | None]]:
    """What a server request may set for itself: every setting's kind and, for numbers, the range, the model's own
    limits included (the most words it writes, capped at `MAX_REQUEST_WORDS`; its vocabulary)."""
    longest = min(MAX_REQUEST_WORDS, limits.longest_caption or MAX_REQUEST_WORDS)
    resolved = {"longest": longest, "vocabulary": limits.vocab_size}
    ranges = {}
    for name, declared in settings().items():
        if declared.request is None:
            ranges[name] = (declared.kind, None, None)
        else:
            low, high = declared.request
            ranges[name] = (declared.kind, low, resolved.get(high, high) if isinstance(high, str) else high)
    return ranges


KIND_NAMES = {
    "int": "whole number",
    "float": "number",
    "bool": "true or false",
    "words": "words",
    "phrase": "words",
    "phrases": "phrases ('a|b': either)",
    "stopping": "true, false or never",
}


def reference_table() -> str:
    """Every decoding setting as a Markdown table (the documentation's reference is made from it)."""
    rows = [
        "| setting | kind | default | allowed | a request may ask for | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for item in dataclasses.fields(DecodingConfig):
        declared: Setting = item.metadata["setting"]
        request = (
            "as allowed"
            if declared.request is None
            else (
                f"{declared.request[0]:g} to "
                + (
                    f"{declared.request[1]:g}"
                    if not isinstance(declared.request[1], str)
                    else f"the model's {declared.request[1]}"
                )
            )
        )
        rows.append(
            f"| `{item.name}` | {KIND_NAMES[declared.kind]} | `{item.default!r}` | {declared.bounds() or '-'} "
            f"| {request} | {declared.help} |"
        )
    return "\n".join(rows)


def _documented() -> str:
    """The class docstring's Attributes section, from the declarations (jsonargparse and the docs read it)."""
    lines = [DecodingConfig.__doc__.rstrip(), "", "    Attributes:"]
    for name, declared in settings().items():
        bounds = f" ({declared.bounds()})" if declared.bounds() and declared.bounds() != "any" else ""
        lines.append(f"        {name}: {declared.help}{bounds}")
    return "\n".join(lines) + "\n"


DecodingConfig.__doc__ = _documented()


# ---------------------------------------------------------------- on a command line (caption, serve)
def phrases_argument(values: list[str] | None) -> tuple | None:
    """Phrases given on a command line or in a form: each value a phrase, `|` between phrases any one of which will
    do ("circle|square")."""
    if values is None:
        return None
    return tuple(value if "|" not in value else tuple(part.strip() for part in value.split("|")) for value in values)


def add_arguments(parser: Any) -> None:
    """Every decoding setting as an `argparse` option, from its declaration (`--num_beams 5`, `--bad_endings a with`,
    `--force_words red "on the left" "circle|square"`), default: the model's own; the 0.2 names `--beam_size` and
    `--max_decode_length` too, and `--rerank_clip`."""
    group = parser.add_argument_group("decoding (default: the model's own settings)")
    for name, declared in settings().items():
        bounds = f" ({declared.bounds()})" if declared.bounds() not in ("", "any") else ""
        help_text = declared.help.replace("%", "%%") + bounds
        if declared.kind == "words":
            group.add_argument(f"--{name}", nargs="*", default=None, metavar="WORD", help=help_text)
        elif declared.kind == "phrases":
            group.add_argument(
                f"--{name}", nargs="*", default=None, metavar="PHRASE", help=help_text + " 'a|b': either."
            )
        elif declared.kind == "bool":
            group.add_argument(f"--{name}", action="store_true", default=None, help=help_text)
        elif declared.kind == "stopping":
            group.add_argument(f"--{name}", choices=["true", "false", "never"], default=None, help=help_text)
        else:
            group.add_argument(
                f"--{name}", type={"int": int, "float": float}.get(declared.kind, str), default=None, help=help_text
            )
    for old, new in RENAMED.items():
        if old != "beams":
            group.add_argument(f"--{old}", type=int, default=None, help=f"deprecated: --{new}")
    group.add_argument(
        "--rerank_clip",
        default=None,
        metavar="CLIP",
        help="reorder the beam's alternatives by CLIPScore with this CLIP model (ViT-B-32:openai, a "
        "Hugging Face id or folder) before taking the best; torch only",
    )


def overrides_from(options: Any) -> dict[str, Any]:
    """The decoding settings given on the command line (`add_arguments`), for `with_overrides`."""
    names = [f.name for f in dataclasses.fields(DecodingConfig)] + [old for old in RENAMED if old != "beams"]
    chosen = {name: getattr(options, name) for name in names if getattr(options, name, None) is not None}
    if "early_stopping" in chosen:
        chosen["early_stopping"] = {"true": True, "false": False}.get(chosen["early_stopping"], "never")
    for name, declared in settings().items():
        if declared.kind == "phrases" and name in chosen:
            chosen[name] = phrases_argument(chosen[name])
    return chosen
