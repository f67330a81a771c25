"""Caption decoders: the protocol (`base`) and one file per decoder. See `base` for how to write your own."""

from captioner.models.decoders.attention import AttentionDecoder
from captioner.models.decoders.base import CaptionDecoder, DecoderOutput
from captioner.models.decoders.lstm import LSTMDecoder
from captioner.models.decoders.prefix_lm import GridPrefixLMDecoder, PrefixLMDecoder
from captioner.models.decoders.transformer import TransformerDecoder

__all__ = [
    "AttentionDecoder",
    "CaptionDecoder",
    "DecoderOutput",
    "GridPrefixLMDecoder",
    "LSTMDecoder",
    "PrefixLMDecoder",
    "TransformerDecoder",
]
