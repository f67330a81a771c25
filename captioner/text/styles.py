"""Caption styles: one model that writes a short caption, a long one or tags, as it is asked.

A dataset is *styled* when some of its captions carry a style (a `style` field of a COCO annotation, a JSON Lines
object or a CSV row; a folder's `photo.<style>.txt` beside `photo.txt`; a shard's `<key>.<style>.txt` member).
Every caption of a styled dataset is then trained as its style's *marker*, one word, followed by the caption:

    "yellow, square, small, top, dotted background"  (style tags)
    ->  "xxstyletags yellow xxsep square xxsep small xxsep top xxsep dotted background"

so any tokenizer writes it (the marker and the separator are plain lowercase words: a word vocabulary keeps them,
a BPE learns them, a pretrained language model's tokenizer spells them), and any decoder learns it: the marker is
the caption's first token, and what follows is conditioned on it. Commas become the word `xxsep` because word
tokenizers drop punctuation, and tags are read by their commas. A caption without a style in a styled dataset
has the style `caption`.

At inference the style is a decoding setting (`style`: `caption --style tags`, `Captioner.caption(...,
style="tags")`, a server request's `style`, the exported runtime): its marker is forced as the caption's first
token (as `prefix` forces words), and the text a model writes is given back without it, commas restored
(`plain_caption`). A model's styles are its tokenizer's `styles` (in its checkpoint and export), the first one
its default. A model trained without styles knows none and decodes as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from captioner.core.errors import CaptionerError
from captioner.sources.records import STYLE_NAME, CaptionRecord

STYLE_MARK = "xxstyle"  # fastai's convention for words that are markup, not language: xxbos, xxmaj
SEPARATOR = "xxsep"
DEFAULT_STYLE = "caption"
_MARKER = re.compile(rf"\s*{STYLE_MARK}[a-z0-9]+\b\s*")
_SEPARATOR = re.compile(rf"\s*\b{SEPARATOR}\b\s*")


def checked_style(name: object, where: str) -> str:
    """A style's name, checked: lowercase letters and digits, starting with a letter (it becomes a word).

    Raises:
        CaptionerError: Naming `where` it came from and what a name may be.
    """
    if not isinstance(name, str) or not STYLE_NAME.fullmatch(name):
        raise CaptionerError(
            f"Style {name!r} in {where}: a style is a name of lowercase letters and digits starting with a letter "
            "(short, long, tags), at most 32 characters."
        )
    return name


def marker(style: str) -> str:
    """The word a caption of `style` starts with."""
    return f"{STYLE_MARK}{style}"


def styled_text(caption: str, style: str) -> str:
    """A caption as a styled model is trained on it: its style's marker, then the caption, commas as `xxsep`."""
    return f"{marker(style)} {caption.replace(',', f' {SEPARATOR} ')}"


def plain_caption(text: str) -> str:
    """A caption as written by a model, for its reader: a leading style marker removed, `xxsep` back to commas.
    Text without markers (every caption of a model trained without styles) comes back as it is."""
    if STYLE_MARK not in text and SEPARATOR not in text:
        return text
    text = _MARKER.sub(" ", text).strip()
    return _SEPARATOR.sub(", ", text).strip(", ")


def is_markup(word: str) -> bool:
    """Whether a word is a style's marker or the separator (not a word of the caption: metrics leave it out)."""
    return word == SEPARATOR or (word.startswith(STYLE_MARK) and len(word) > len(STYLE_MARK))


def styles_in_order(styles: Iterable[str | None]) -> tuple[str, ...]:
    """A dataset's styles (the captions' styles, None for none), the default first: `caption` when some caption has
    no style, else the first style met. Empty when no caption has one (the dataset is not styled)."""
    seen = dict.fromkeys(styles)
    if not any(style is not None for style in seen):
        return ()
    named = [style for style in seen if style is not None and style != DEFAULT_STYLE]
    return (DEFAULT_STYLE, *named) if None in seen or DEFAULT_STYLE in seen else tuple(named)


def style_of(requested: str | None, styles: tuple[str, ...]) -> str | None:
    """The style a caption is written in: the one requested, else the model's default (None: a model without
    styles, asked for none).

    Raises:
        CaptionerError: A style the model was not trained on, naming those it was.
    """
    if requested is None:
        return styles[0] if styles else None
    if not styles:
        raise CaptionerError(
            f"style={requested!r}: this model was trained without caption styles (train it on captions that carry a "
            "style to choose one)."
        )
    if requested not in styles:
        raise CaptionerError(f"style={requested!r} is not one of this model's styles: {', '.join(styles)}.")
    return requested


def dataset_styles(records: Iterable[CaptionRecord]) -> tuple[str, ...]:
    """The styles of a dataset's captions, in `styles_in_order`'s order (empty: not styled)."""
    return styles_in_order(record.style_of(index) for record in records for index in range(len(record.captions)))


def training_texts(record: CaptionRecord, styles: tuple[str, ...]) -> tuple[str, ...]:
    """A record's captions as a model of `styles` learns them: each with its style's marker (a caption without a
    style is the default's, `caption`), or as written for a model without styles."""
    if not styles:
        return record.captions
    return tuple(styled_text(caption, record.style_of(i) or DEFAULT_STYLE) for i, caption in enumerate(record.captions))


def captions_in_style(record: CaptionRecord, style: str | None, styles: tuple[str, ...]) -> tuple[str, ...]:
    """A record's references in `style` (every caption, for a model without styles)."""
    return record.captions_in(style, DEFAULT_STYLE) if styles else record.captions


def default_references(record: CaptionRecord, styles: tuple[str, ...]) -> tuple[str, ...]:
    """What a model's default captions are scored against: the default style's captions (every caption of an image
    that has none in it, or of a model without styles)."""
    return (captions_in_style(record, styles[0], styles) if styles else ()) or record.captions


def all_training_texts(records: Iterable[CaptionRecord], styles: tuple[str, ...]) -> Iterator[str]:
    """Every caption of the records as a model of `styles` learns it (what its tokenizer is built from)."""
    for record in records:
        yield from training_texts(record, styles)
