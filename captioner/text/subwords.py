"""Subword tokenizers (Hugging Face `tokenizers`, torch-free): byte-level BPE trained on the training captions, or a
pretrained one by hub id (GPT-2's, to caption with GPT-2). See `captioner.text.base` for the interface."""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.core.errors import CaptionerError
from captioner.text.base import TokenizerRecipe, TokenSequences
from captioner.text.styles import plain_caption
from captioner.text.words import normalize

if TYPE_CHECKING:
    import torch

SUBWORDS_VERSION = 1
PAD, START, END = "<pad>", "<start>", "<end>"
_SPACES = re.compile(r"\s+")


def word_id(word: str) -> int:
    """A word's id for CIDEr-D: from its text alone (56 bits of a hash, fitting int64), so every process, rank and
    run gives a word the same id whatever it saw first."""
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=7).digest(), "big")


def _tokenizers() -> Any:
    try:
        return importlib.import_module("tokenizers")
    except ImportError:
        raise CaptionerError("Subword tokenizers need the tokenizers package: pip install 'captioner[hf]'.") from None


class SubwordTokenizer(TokenSequences):
    """A `tokenizers.Tokenizer` with the ids search and metrics need.

    Args:
        tokenizer: The trained or pretrained tokenizer (its JSON travels in checkpoints and exports).
        max_length: The most tokens a caption keeps.
        pad, start, end: The ids of padding, the start token (fed first, never generated) and the end token.
        lowercase: Captions are normalised as words are (lower case, punctuation dropped) before tokenising (a
            BPE trained here); a pretrained tokenizer sees them as written.
        source: Where it came from, for messages ("bpe 1000" or a hub id).
    """

    unk_index = None

    def __init__(
        self, tokenizer: Any, max_length: int, pad: int, start: int, end: int, lowercase: bool, source: str
    ) -> None:
        if len({pad, start, end}) != 3:
            raise CaptionerError(
                f"The tokenizer {source} needs distinct padding, start and end ids, got {pad}, {start}, {end}."
            )
        self.tokenizer, self.max_length, self.lowercase, self.source = tokenizer, max_length, lowercase, source
        self.pad_index, self.start_index, self.end_index = pad, start, end
        self._words: dict[str, int] = {}  # memo of word_id
        self._stoi: dict[str, int] | None = None

    # ------------------------------------------------------------ the interface
    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubwordTokenizer) and self.to_dict() == other.to_dict()

    @property
    def banned(self) -> tuple[int, ...]:
        return (self.pad_index, self.start_index)

    def describe(self) -> str:
        return f"{self.source}, {len(self)} tokens"

    def _text(self, caption: str) -> str:
        return " ".join(normalize(caption)) if self.lowercase else _SPACES.sub(" ", caption).strip()

    def encode(self, caption: str) -> list[int]:
        """`<start>` + the caption's tokens (at most `max_length`) + the end token."""
        ids = self.tokenizer.encode(self._text(caption), add_special_tokens=False).ids[: self.max_length]
        return [self.start_index, *ids, self.end_index]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the tokens up to the end token."""
        return plain_caption(self.tokenizer.decode(self._caption_ids(ids), skip_special_tokens=True).strip())

    def phrase_tokens(self, text: str) -> list[list[int]]:
        """As written first in a caption and after a space (byte-level BPE writes `Ġword` there): either form counts."""
        forms = []
        for variant in (self._text(text), " " + self._text(text)):
            ids = self.tokenizer.encode(variant, add_special_tokens=False).ids
            if ids and ids not in forms:
                forms.append(ids)
        return forms

    def _word_ids(self, text: str) -> list[int]:
        ids = []
        for word in normalize(text):
            if word not in self._words:
                self._words[word] = word_id(word)
            ids.append(self._words[word])
        return ids

    def words_of(self, ids: torch.Tensor) -> list[list[int]]:
        """The words of each generated caption, as ids: CIDEr-D scores words, not subword pieces."""
        return [self._word_ids(self.decode(row)) for row in ids.tolist()]

    def reference_words(self, caption: str) -> list[int]:
        return self._word_ids(caption)

    @property
    def stoi(self) -> dict[str, int]:
        """Ids of the words that are one token (a word-initial piece), for rules that name words."""
        if self._stoi is None:
            vocab = self.tokenizer.get_vocab(with_added_tokens=False)
            self._stoi = {token[1:]: index for token, index in vocab.items() if token.startswith("\u0120")}
        return self._stoi

    # ------------------------------------------------------------ saved and read back
    def to_dict(self) -> dict:
        return {
            "class_path": "captioner.text.subwords.SubwordTokenizer",
            "version": SUBWORDS_VERSION,
            "tokenizer": self.tokenizer.to_str(),
            "max_length": self.max_length,
            "pad": self.pad_index,
            "start": self.start_index,
            "end": self.end_index,
            "lowercase": self.lowercase,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, payload: dict, source: str = "tokenizer") -> SubwordTokenizer:
        """Read back `to_dict` output, checking it.

        Raises:
            CaptionerError: When a key is missing, the version differs or the tokenizer JSON does not load.
        """
        if not isinstance(payload, dict) or payload.get("version") != SUBWORDS_VERSION:
            raise CaptionerError(f"The subword tokenizer in {source} is missing or of another version.")
        try:
            tokenizer = _tokenizers().Tokenizer.from_str(payload["tokenizer"])
            return cls(
                tokenizer,
                int(payload["max_length"]),
                int(payload["pad"]),
                int(payload["start"]),
                int(payload["end"]),
                bool(payload["lowercase"]),
                str(payload["source"]),
            )
        except (KeyError, TypeError, ValueError, Exception) as error:
            if isinstance(error, CaptionerError):
                raise
            raise CaptionerError(f"The subword tokenizer in {source} does not load ({error}).") from error


class Bpe(TokenizerRecipe):
    """Byte-level BPE trained on the training captions (normalised like words): no word is ever `<unk>`.

    Args:
        vocab_size: Tokens in all, the three special ones included.
        max_tokens: The most tokens a caption keeps (captions are cut there).
        min_frequency: Pairs seen fewer times are not merged.
    """

    def __init__(self, vocab_size: int = 2000, max_tokens: int = 48, min_frequency: int = 2) -> None:
        self.vocab_size, self.max_tokens, self.min_frequency = vocab_size, max_tokens, min_frequency

    def describe(self) -> dict:
        return {
            "class_path": "captioner.text.Bpe",
            "vocab_size": self.vocab_size,
            "max_tokens": self.max_tokens,
            "min_frequency": self.min_frequency,
        }

    def build(self, captions: Iterable[str], max_length: int, min_count: int = 5) -> SubwordTokenizer:
        library = _tokenizers()
        tokenizer = library.Tokenizer(library.models.BPE())
        tokenizer.pre_tokenizer = library.pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = library.decoders.ByteLevel()
        trainer = library.trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=[PAD, START, END],
            initial_alphabet=library.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator((" ".join(normalize(caption)) for caption in captions), trainer)
        ids = [tokenizer.token_to_id(token) for token in (PAD, START, END)]
        return SubwordTokenizer(tokenizer, self.max_tokens, *ids, lowercase=True, source=f"bpe {self.vocab_size}")


class Pretrained(TokenizerRecipe):
    """A pretrained tokenizer by hub id (or a local folder or tokenizer.json), to caption with that model's
    language model (`captioner.models.decoders.PrefixLMDecoder`): GPT-2's by default. Padding and start tokens
    are added to it; its own end-of-text token ends captions.

    Args:
        model_id: A hub id (gpt2, distilgpt2, ...) or a path.
        end_token: The token that ends a caption.
        max_tokens: The most tokens a caption keeps.
    """

    def __init__(self, model_id: str = "gpt2", end_token: str = "<|endoftext|>", max_tokens: int = 48) -> None:
        self.model_id, self.end_token, self.max_tokens = model_id, end_token, max_tokens

    def describe(self) -> dict:
        return {
            "class_path": "captioner.text.Pretrained",
            "model_id": self.model_id,
            "end_token": self.end_token,
            "max_tokens": self.max_tokens,
        }

    def build(self, captions: Iterable[str], max_length: int, min_count: int = 5) -> SubwordTokenizer:
        library = _tokenizers()
        path = Path(self.model_id)
        try:
            if path.is_dir():
                tokenizer = library.Tokenizer.from_file(str(path / "tokenizer.json"))
            elif path.is_file():
                tokenizer = library.Tokenizer.from_file(str(path))
            else:
                tokenizer = library.Tokenizer.from_pretrained(self.model_id)
        except Exception as error:  # the hub client raises many types when offline
            from captioner.core.hub import hub_error

            raise hub_error(self.model_id, error) from error
        end = tokenizer.token_to_id(self.end_token)
        if end is None:
            raise CaptionerError(
                f"The tokenizer {self.model_id} has no token {self.end_token!r} to end captions with: set end_token."
            )
        tokenizer.add_special_tokens([PAD, START])
        return SubwordTokenizer(
            tokenizer,
            self.max_tokens,
            tokenizer.token_to_id(PAD),
            tokenizer.token_to_id(START),
            end,
            lowercase=False,
            source=self.model_id,
        )
