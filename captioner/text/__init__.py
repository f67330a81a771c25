"""The text side as parts (see `captioner.text.base`): the word vocabulary (the default) and subword tokenizers,
chosen with `--data.tokenizer` (`Words`, `Bpe`, `Pretrained`, or your own recipe)."""

from captioner.text.base import TokenizerRecipe, tokenizer_from_dict, tokenizer_to_dict
from captioner.text.subwords import Bpe, Pretrained, SubwordTokenizer
from captioner.text.words import Vocabulary, Words, normalize

__all__ = [
    "Bpe",
    "Pretrained",
    "SubwordTokenizer",
    "TokenizerRecipe",
    "Vocabulary",
    "Words",
    "normalize",
    "tokenizer_from_dict",
    "tokenizer_to_dict",
]
