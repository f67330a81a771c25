"""The text side as parts: what every tokenizer provides, and how a saved one is read back (torch-free: the
exported runtime decodes with it).

A *recipe* is chosen in the config (`--data.tokenizer`, by `class_path`) and
builds a tokenizer from the training captions once, when data is prepared:

    data:
      tokenizer:
        class_path: captioner.text.Bpe          # or Words (the default), Pretrained, or your own
        init_args: {vocab_size: 1000}

    class MyRecipe(TokenizerRecipe):
        def describe(self) -> dict: ...                                  # keys the prepared data
        def build(self, captions, max_length, min_count) -> Tokenizer: ...

The *tokenizer* it builds is what the model, search, metrics, writers,
checkpoints and exports use:

- `pad_index`, `start_index`, `end_index` (distinct ids), `banned` (ids never
  generated), `max_length` (the most tokens a caption keeps), `len()`;
- `encode(caption) -> [start, ..., end]`, `encode_batch(captions)` (a padded
  `(N, max_length + 2)` tensor), `decode(ids) -> text`, `decode_batch`;
- `words_of(ids)` and `reference_words(caption)`: the *words* of a generated
  and of a reference caption as ids, which CIDEr-D (validation, self-critical
  rewards) scores, so a subword tokenizer is scored on words, not pieces;
- `stoi`: ids of the words that are single tokens (for rules that name words,
  such as `bad_endings`); `phrase_tokens(text)` and `prefix_tokens(text)`: the
  tokens a phrase is written as inside a caption and at its start (decoding
  constraints);
- `to_dict()` (with its `class_path`) and `from_dict(payload, source)`;
  `tokenizer_from_dict` reads any of them back;
- `styles`: the caption styles it was built for (`captioner.text.styles`, the default first; empty for a model
  without styles), set by data preparation and saved beside its `to_dict()` by `tokenizer_to_dict`. Its `decode`
  gives captions without their style's marker (`captioner.text.styles.plain_caption`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from captioner.core.errors import CaptionerError
from captioner.core.parts import import_trusted_class
from captioner.text.styles import checked_style

if TYPE_CHECKING:
    import numpy as np
    import torch


class TokenizerRecipe:
    """Base class of tokenizer recipes (see the module docstring)."""

    def describe(self) -> dict:
        """The recipe's settings: part of the prepared data's key (another recipe, another vocabulary)."""
        raise NotImplementedError

    def build(self, captions: Iterable[str], max_length: int, min_count: int = 5) -> Any:
        """The tokenizer for these training captions (`max_length` and `min_count`: the data's settings)."""
        raise NotImplementedError


class TokenSequences:
    """What every tokenizer does the same way once it can `encode` and `decode` one caption: batches, and the
    caption's ids between `<start>` and the end token. Subclasses set `pad_index`, `start_index`, `end_index`
    and `max_length`."""

    pad_index: int
    start_index: int
    end_index: int
    max_length: int
    styles: tuple[str, ...] = ()  # the caption styles it was built for (captioner.text.styles)

    def encode(self, caption: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, captions: Sequence[str]) -> torch.Tensor:
        """Encode captions into one `(N, max_length + 2)` int64 tensor padded with `pad_index`."""
        import torch  # here only: the exported runtime decodes with these classes where torch is not installed

        out = torch.full((len(captions), self.max_length + 2), self.pad_index, dtype=torch.long)
        for row, caption in enumerate(captions):
            ids = self.encode(caption)
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode_batch(self, ids: torch.Tensor | np.ndarray) -> list[str]:
        """Decode each row of a `(B, T)` tensor or array of ids."""
        return [self.decode(row) for row in ids.tolist()]

    def phrase_tokens(self, text: str) -> list[list[int]]:
        """The token sequences `text` can be written as inside a caption (one for a word vocabulary; a subword
        tokenizer may add the form with the space before it): what `force_words` and `bad_words` match. A word the
        tokenizer cannot write comes back as its unknown token (`unk_index`)."""
        ids = self._caption_ids(self.encode(text))
        return [ids] if ids else []

    def prefix_tokens(self, text: str) -> list[int]:
        """The tokens a caption that starts with `text` starts with (what `prefix` forces)."""
        return self._caption_ids(self.encode(text))

    def _caption_ids(self, ids: Iterable[int]) -> list[int]:
        """The ids up to the first end token, with start and padding left out."""
        kept = []
        for index in map(int, ids):
            if index == self.end_index:
                break
            if index not in (self.start_index, self.pad_index):
                kept.append(index)
        return kept


def tokenizer_from_dict(payload: dict, source: str = "tokenizer", built_in_only: bool = False) -> Any:
    """A tokenizer saved with its `to_dict()` (a word vocabulary of captioner 0.2 has no `class_path`: words).

    Args:
        payload: What `to_dict()` wrote.
        source: The file it was read from, for messages.
        built_in_only: Read only captioner's own tokenizers (the exported runtime), whatever modules are allowed
            (see `captioner.core.parts.import_trusted_class`).

    Raises:
        CaptionerError: When the payload names no tokenizer class that may be imported, or is malformed.
    """
    if not isinstance(payload, dict):
        raise CaptionerError(f"The tokenizer in {source} is malformed: {payload!r}.")
    path = payload.get("class_path", "captioner.text.words.Vocabulary")
    cls = import_trusted_class(path, object, "tokenizer", source, built_in_only)
    if not hasattr(cls, "from_dict"):
        raise CaptionerError(f"The tokenizer class {path} in {source} has no from_dict.")
    tokenizer = cls.from_dict({key: value for key, value in payload.items() if key != "styles"}, source)
    styles = payload.get("styles") or []
    if not isinstance(styles, list):
        raise CaptionerError(f"The tokenizer's styles in {source} are malformed: {styles!r} (a list of names).")
    styles = tuple(checked_style(style, f"the tokenizer of {source}") for style in styles)
    if styles:
        tokenizer.styles = styles
    return tokenizer


def tokenizer_to_dict(tokenizer: Any) -> dict:
    """A tokenizer's `to_dict()`, with the caption styles it was built for where it has any (what checkpoints,
    exports and prepared data save; `tokenizer_from_dict` reads both back)."""
    payload = tokenizer.to_dict()
    styles = tuple(getattr(tokenizer, "styles", ()) or ())
    return {**payload, "styles": list(styles)} if styles else payload


def same_tokenizer_message(saved: Any, configured: Any) -> str:
    """What differs between two tokenizers, for a refusal."""
    return (
        f"{type(saved).__name__} with {saved.describe()} in the checkpoint, {type(configured).__name__} with "
        f"{configured.describe()} prepared from this data"
    )
