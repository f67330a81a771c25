"""Caption normalisation, and the word vocabulary built from training captions (the default text side; see
`captioner.text.base` for what every tokenizer provides)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from captioner.core.errors import CaptionerError
from captioner.core.files import read_json, require_keys, write_json
from captioner.text.base import TokenizerRecipe, TokenSequences
from captioner.text.styles import is_markup, plain_caption

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
VOCAB_VERSION = 1

if TYPE_CHECKING:
    import torch

_APOSTROPHES = re.compile(r"['\u2019`]")
_NOT_WORD = re.compile(r"[^\w\s]|_")


def normalize(text: str) -> list[str]:
    """Split a caption into lowercase words with punctuation stripped.

    Apostrophes are dropped inside words ("man's" -> "mans") and every other
    punctuation mark separates words ("t-shirt" -> "t shirt"). Letters of any
    script are kept. Validation references go through the same function, so
    BLEU compares like with like.

    Args:
        text: A caption as written.

    Returns:
        The caption's words.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _APOSTROPHES.sub("", text)
    return _NOT_WORD.sub(" ", text).split()


class Vocabulary(TokenSequences):
    """Words <-> ids, with `<pad>`=0, `<start>`=1, `<end>`=2, `<unk>`=3.

    Args:
        words: The regular words, most frequent first.
        max_length: The most words a caption keeps when encoded.
        min_count: The count threshold the words were chosen with (kept for the record).
    """

    pad_index, start_index, end_index, unk_index = 0, 1, 2, 3

    def __init__(self, words: Sequence[str], max_length: int = 34, min_count: int = 1) -> None:
        self.itos: list[str] = list(SPECIAL_TOKENS) + list(words)
        self.stoi: dict[str, int] = {word: index for index, word in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique and must not repeat special tokens")
        self.max_length = max_length
        self.min_count = min_count

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos and self.max_length == other.max_length

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5, max_length: int = 34) -> Vocabulary:
        """Count words over `captions` and keep those seen at least `min_count` times.

        Words are ordered by falling count, ties broken alphabetically, so the
        same captions always give the same ids.
        """
        if min_count < 1:
            raise CaptionerError(f"--data.captions.min_word_count must be at least 1, got {min_count}.")
        counts = Counter(word for caption in captions for word in normalize(caption))
        kept = sorted(  # a style's marker is kept however rare the style (captioner.text.styles)
            (w for w, c in counts.items() if (c >= min_count or is_markup(w)) and w not in SPECIAL_TOKENS),
            key=lambda w: (-counts[w], w),
        )
        return cls(kept, max_length=max_length, min_count=min_count)

    def encode(self, caption: str) -> list[int]:
        """`<start>` + word ids (unknown words as `<unk>`, cut at `max_length`) + `<end>`."""
        ids = [self.stoi.get(word, self.unk_index) for word in normalize(caption)[: self.max_length]]
        return [self.start_index, *ids, self.end_index]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first `<end>`, with `<start>` and `<pad>` left out (and a style's marker: commas back)."""
        return plain_caption(" ".join(self.itos[index] for index in self._caption_ids(ids)))

    def words_of(self, ids: torch.Tensor) -> list[list[int]]:
        """The word ids of each row of a `(B, T)` tensor, up to the first `<end>`, specials and a style's markup
        left out: what CIDEr-D scores (validation, self-critical rewards)."""
        markup = self._markup_ids
        return [[index for index in self._caption_ids(row) if index not in markup] for row in ids.tolist()]

    @property
    def _markup_ids(self) -> frozenset[int]:
        """The ids of style markers and the separator (`captioner.text.styles`): none for a model without styles."""
        if not hasattr(self, "_markup"):
            self._markup = frozenset(index for word, index in self.stoi.items() if is_markup(word))
        return self._markup

    def reference_words(self, caption: str) -> list[int]:
        """A reference caption's word ids, as `words_of` gives a generated caption's."""
        return self._caption_ids(self.encode(caption))

    @property
    def banned(self) -> tuple[int, ...]:
        """Tokens never generated: `<pad>`, `<start>`, `<unk>`."""
        return (self.pad_index, self.start_index, self.unk_index)

    def describe(self) -> str:
        return f"{len(self)} words (seen at least {self.min_count} times in training captions)"

    def to_dict(self) -> dict:
        """A JSON-ready form, stored in `vocab.json` and in checkpoints."""
        return {
            "class_path": "captioner.text.words.Vocabulary",
            "version": VOCAB_VERSION,
            "max_length": self.max_length,
            "min_count": self.min_count,
            "words": self.itos[len(SPECIAL_TOKENS) :],
        }

    @classmethod
    def from_dict(cls, payload: dict, source: str = "vocabulary") -> Vocabulary:
        """Rebuild a vocabulary from `to_dict` output, checking its structure.

        Raises:
            CaptionerError: When a key is missing or the version differs.
        """
        require_keys(payload, ("version", "max_length", "min_count", "words"), source, "Vocabulary")
        if payload["version"] != VOCAB_VERSION:
            raise CaptionerError(f"Vocabulary in {source} has version {payload['version']}, expected {VOCAB_VERSION}.")
        try:
            return cls(payload["words"], max_length=int(payload["max_length"]), min_count=int(payload["min_count"]))
        except (TypeError, ValueError) as error:
            raise CaptionerError(f"Vocabulary in {source} is malformed ({error}); delete it to rebuild.") from error

    def save(self, path: str | Path) -> None:
        """Write `vocab.json` atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read and validate a vocabulary written by `save`."""
        return cls.from_dict(read_json(path, "Vocabulary"), str(path))


class Words(TokenizerRecipe):
    """The word vocabulary as a tokenizer recipe (the default): words seen at least `min_count` times in the training
    captions, the rest `<unk>`; captions cut at `max_length` words (the data's `min_word_count` and
    `max_caption_length` when not set here).

    Args:
        min_count: Words seen fewer times in training captions become `<unk>` (None: `--data.captions.min_word_count`).
    """

    def __init__(self, min_count: int | None = None) -> None:
        self.min_count = min_count

    def describe(self) -> dict:
        return {"class_path": "captioner.text.Words", "min_count": self.min_count}

    def build(self, captions: Iterable[str], max_length: int, min_count: int = 5) -> Vocabulary:
        return Vocabulary.build(captions, self.min_count or min_count, max_length)
