"""Decoding, defined once: the saved settings (`DecodingConfig`), the logits rules, and the search that the PyTorch
captioner and the torch-free runtime both run (`search.decode`, over `ops.NumpyOps` or `torch_ops.TorchOps`).

Nothing here imports torch except `torch_ops`: the exported runtime decodes with this package.
"""

from captioner.decoding.config import DecodingConfig, ModelLimits, SpecialTokens

__all__ = ["DecodingConfig", "ModelLimits", "SpecialTokens"]
