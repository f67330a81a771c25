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


@dataclass(frozen=True)
class DecodingConfig:
    """Every setting of caption decoding (Hugging Face's `GenerationConfig`, for captions).

    Attributes:
        num_beams: Live hypotheses per image (1: greedy decoding, or sampling with `do_sample`).
        num_return: Ranked captions returned per image (at most `num_beams`; 1: the best only).
        length_penalty: GNMT alpha for ranking finished captions, `score / ((5 + length) / 6) ** alpha`
            (0: raw log-probability; > 0 favours longer captions).
        max_length: Most words per caption (None: the vocabulary's maximum caption length).
        min_length: `<end>` is not allowed before this many words.
        no_repeat_ngram_size: No n-gram of this size appears twice in a caption (0: off).
        bad_endings: Words a caption may not end on ("a", "with", ...): `<end>` is not allowed right after them.
        prefix: Every caption starts with these words (a trigger word, "a photo of"), forced token by token.
        force_words: Words or phrases every caption must hold, each entry a phrase ("red", "on the left") or a list
            of phrases any one of which will do (["circle", "square"]); searched for with constrained beam search
            (dynamic beam allocation: beams kept for every level of progress through the constraints). A caption
            that cannot meet them within `max_length` is returned anyway, best first, marked as not meeting them.
        bad_words: Words or phrases no caption may hold (the last token of a phrase is refused after the others).
        early_stopping: When an image's beam search stops, once it has `num_beams` finished captions: at once
            (True); when no live hypothesis beats the worst of them at its current length (False: Hugging Face's
            heuristic, exact without a length penalty); or only when none could at any length up to `max_length`
            ("never": exact with any length penalty, slower).
        num_beam_groups: Diverse beam search (Vijayakumar et al.): beams split into this many groups, each group
            penalised for the words the earlier groups chose at the same step.
        diversity_penalty: The penalty per earlier choice of the same word (with `num_beam_groups` > 1).
        do_sample: Draw each word from the model's distribution instead of searching (with `num_beams` 1).
        temperature: Divide the scores by this before sampling.
        top_k: Sample from the k most likely words only (0: all).
        top_p: Sample from the smallest set of words whose probability reaches p (nucleus sampling; 1: all).
        seed: Seed of sampling (None: the global generator).
    """

    num_beams: int = 3
    num_return: int = 1
    length_penalty: float = 0.0
    max_length: int | None = None
    min_length: int = 0
    no_repeat_ngram_size: int = 0
    bad_endings: tuple[str, ...] = field(default_factory=tuple)
    prefix: str | None = None
    force_words: tuple[str | tuple[str, ...], ...] = field(default_factory=tuple)
    bad_words: tuple[str, ...] = field(default_factory=tuple)
    early_stopping: bool | Literal["never"] = False
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bad_endings", tuple(self.bad_endings))
        object.__setattr__(self, "bad_words", tuple(self.bad_words))
        object.__setattr__(self, "force_words", tuple(entry if isinstance(entry, str) else tuple(entry)
                                                      for entry in self.force_words))  # fmt: skip
        problems = []
        if self.num_beams < 1:
            problems.append(f"num_beams={self.num_beams} (at least 1)")
        if not 1 <= self.num_return <= max(self.num_beams, 1):
            problems.append(f"num_return={self.num_return} (1 to num_beams={self.num_beams})")
        if self.max_length is not None and self.max_length < 1:
            problems.append(f"max_length={self.max_length} (at least 1)")
        if self.min_length < 0 or self.no_repeat_ngram_size < 0 or self.top_k < 0:
            problems.append("min_length, no_repeat_ngram_size and top_k are counts (0 or more)")
        if self.num_beam_groups < 1 or self.num_beams % self.num_beam_groups:
            problems.append(f"num_beam_groups={self.num_beam_groups} (a divisor of num_beams={self.num_beams})")
        if self.do_sample and self.num_beams != 1:
            problems.append("do_sample with num_beams > 1 (sampling draws one caption per image)")
        if self.early_stopping not in (True, False, "never"):
            problems.append(f"early_stopping={self.early_stopping!r} (true, false or never)")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            problems.append(f"temperature={self.temperature} (> 0) and top_p={self.top_p} (in (0, 1])")
        phrases = [*self.bad_words, *(p for e in self.force_words for p in ([e] if isinstance(e, str) else e))]
        if not all(isinstance(phrase, str) and phrase.strip() for phrase in phrases) or (
                self.prefix is not None and not self.prefix.strip()):  # fmt: skip
            problems.append("prefix, force_words and bad_words hold words (no empty ones)")
        if self.force_words and (self.do_sample or self.num_beam_groups > 1):
            problems.append("force_words with sampling or diverse groups (constrained beam search only)")
        if problems:
            raise CaptionerError("Decoding settings out of range: " + "; ".join(problems) + ".")

    # ------------------------------------------------------------ saved and overridden
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, stored in checkpoints and export manifests."""
        return {**dataclasses.asdict(self), "bad_endings": list(self.bad_endings), "bad_words": list(self.bad_words),
                "force_words": [e if isinstance(e, str) else list(e) for e in self.force_words]}  # fmt: skip

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
        return dataclasses.replace(self, num_beams=1, num_return=1, do_sample=False, num_beam_groups=1,
                                   force_words=())  # fmt: skip

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
            problems.append(f"{what}: {limits.decoder} writes at most {longest} words (its positions); use "
                            f"max_length {longest} or less")  # fmt: skip
        if self.min_length > words:
            problems.append(f"min_length={self.min_length} is over the {words} words a caption may have")
        if self.top_k > limits.vocab_size:
            problems.append(f"top_k={self.top_k} is over the model's {limits.vocab_size} tokens")
        if self.bad_endings and limits.word_ids is not None:
            unknown = [word for word in self.bad_endings if word not in limits.word_ids]
            if unknown:
                problems.append(f"bad_endings {', '.join(map(repr, unknown))} are not single tokens of this model's "
                                "tokenizer, so it could never end on them as words")  # fmt: skip
        problems += self._phrase_problems(limits.tokenizer, words)
        if problems:
            raise CaptionerError("Decoding settings this model cannot run: " + "; ".join(problems) + ".")
        return self

    def _phrase_problems(self, tokenizer: Any, words: int) -> list[str]:
        """What the model's tokenizer cannot write of `prefix`, `force_words` and `bad_words`."""
        if tokenizer is None:
            return []
        unknown = getattr(tokenizer, "unk_index", None)
        phrases = [*self.bad_words, *(p for e in self.force_words for p in ([e] if isinstance(e, str) else e))]
        unwritable = [phrase for phrase in phrases + ([self.prefix] if self.prefix else [])
                      if not tokenizer.phrase_tokens(phrase)
                      or any(unknown in form for form in tokenizer.phrase_tokens(phrase))]  # fmt: skip
        problems = []
        if unwritable:
            problems.append(f"{', '.join(map(repr, unwritable))}: not in this model's vocabulary")
        if self.prefix and not unwritable and len(tokenizer.prefix_tokens(self.prefix)) > words:
            problems.append(f"prefix {self.prefix!r} is longer than the {words} tokens a caption may have")
        return problems


# ---------------------------------------------------------------- on a command line (caption, serve)
def phrases_argument(values: list[str] | None) -> tuple | None:
    """Phrases given on a command line or in a form: each value a phrase, `|` between phrases any one of which will
    do ("circle|square")."""
    if values is None:
        return None
    return tuple(value if "|" not in value else tuple(part.strip() for part in value.split("|")) for value in values)


def add_arguments(parser: Any) -> None:
    """Every decoding setting as an `argparse` option (`--num_beams 5`, `--bad_endings a with`,
    `--force_words red "on the left" "circle|square"`), default: the model's own; the 0.2 names `--beam_size` and
    `--max_decode_length` too."""
    group = parser.add_argument_group("decoding (default: the model's own settings)")
    kinds = {"int": int, "float": float}
    for item in dataclasses.fields(DecodingConfig):
        kind = kinds.get(str(item.type).split("|")[0].strip(), str)
        if item.name in ("bad_endings", "bad_words"):
            group.add_argument(f"--{item.name}", nargs="*", default=None, metavar="WORDS")
        elif item.name == "force_words":
            group.add_argument("--force_words", nargs="*", default=None, metavar="PHRASE",
                               help="phrases every caption holds; 'a|b': either")  # fmt: skip
        elif item.name in ("do_sample",):
            group.add_argument(f"--{item.name}", action="store_true", default=None)
        elif item.name == "early_stopping":
            group.add_argument("--early_stopping", choices=["true", "false", "never"], default=None)
        else:
            group.add_argument(f"--{item.name}", type=kind, default=None)
    for old, new in RENAMED.items():
        if old != "beams":
            group.add_argument(f"--{old}", type=int, default=None, help=f"deprecated: --{new}")
    group.add_argument("--rerank_clip", default=None, metavar="CLIP",
                       help="reorder the beam's alternatives by CLIPScore with this CLIP model (ViT-B-32:openai, a "
                            "Hugging Face id or folder) before taking the best; torch only")  # fmt: skip


def overrides_from(options: Any) -> dict[str, Any]:
    """The decoding settings given on the command line (`add_arguments`), for `with_overrides`."""
    names = [f.name for f in dataclasses.fields(DecodingConfig)] + [old for old in RENAMED if old != "beams"]
    chosen = {name: getattr(options, name) for name in names if getattr(options, name, None) is not None}
    if "early_stopping" in chosen:
        chosen["early_stopping"] = {"true": True, "false": False}.get(chosen["early_stopping"], "never")
    if "force_words" in chosen:
        chosen["force_words"] = phrases_argument(chosen["force_words"])
    return chosen
