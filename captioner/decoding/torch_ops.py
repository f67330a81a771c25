"""The array operations of `captioner.decoding.ops`, for torch tensors on any device (the PyTorch captioner)."""

from __future__ import annotations

from typing import Any

import torch

Array = torch.Tensor


class TorchOps:
    """The operations on tensors of `device`.

    Args:
        device: Where the search's tensors live (the decoder's device).
    """

    long = torch.long
    float = torch.float32

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def full(self, shape: tuple[int, ...], value: Any, dtype: Any) -> Array:
        return torch.full(shape, value, dtype=dtype, device=self.device)

    def arange(self, count: int) -> Array:
        return torch.arange(count, device=self.device)

    def as_long(self, values: list[int]) -> Array:
        return torch.as_tensor(values, dtype=torch.long, device=self.device)

    def as_float(self, array: Array) -> Array:
        return array.float()

    def copy(self, values: Array) -> Array:
        return values.clone()

    def where(self, condition: Array, a: Any, b: Any) -> Array:
        return torch.where(condition, a, b)

    def concat(self, arrays: list[Array], axis: int) -> Array:
        return torch.cat(arrays, dim=axis)

    def log_softmax(self, scores: Array) -> Array:
        return torch.log_softmax(scores, dim=-1)

    def topk(self, values: Array, k: int) -> tuple[Array, Array]:
        return values.topk(k, dim=-1)

    def argmax(self, values: Array) -> Array:
        return values.argmax(dim=-1)

    def take(self, values: Array, index: Array, axis: int) -> Array:
        if index.dim() < values.dim():  # broadcast trailing dimensions, as numpy's take_along_axis does
            index = index.reshape(*index.shape, *([1] * (values.dim() - index.dim())))
        shape = list(values.shape)
        shape[axis] = index.shape[axis]
        return values.gather(axis, index.expand(*shape))

    def sort_key_order(self, keys: Array) -> Array:
        return torch.sort(keys, dim=-1, stable=True).indices

    def cumsum(self, values: Array) -> Array:
        return values.cumsum(dim=-1)

    def isfinite(self, values: Array) -> Array:
        return torch.isfinite(values)

    def isin(self, values: Array, members: Array) -> Array:
        return torch.isin(values, members)

    def count_tokens(self, tokens: Array, vocab: int) -> Array:
        counts = torch.zeros(tokens.shape[0], vocab, device=tokens.device)
        return counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=counts.dtype))

    def all(self, values: Array) -> bool:
        return bool(values.all())

    def any_along(self, values: Array, axis: int) -> Array:
        return values.any(dim=axis)

    def all_along(self, values: Array, axis: int) -> Array:
        return values.all(dim=axis)

    def sum_along(self, values: Array, axis: int) -> Array:
        return values.sum(dim=axis)

    def max_along(self, values: Array, axis: int) -> Array:
        return values.amax(dim=axis)

    def min_along(self, values: Array, axis: int) -> Array:
        return values.amin(dim=axis)

    def sample(self, probabilities: Array, uniforms: Any) -> Array:
        """As `NumpyOps.sample`, in float64 on the device: the same uniform numbers give the same words."""
        cumulative = probabilities.double().cumsum(dim=-1)
        draws = torch.as_tensor(uniforms, dtype=torch.float64, device=self.device).reshape(-1, 1) * cumulative[:, -1:]
        return (cumulative <= draws).sum(dim=-1).clamp(max=probabilities.shape[-1] - 1)

    def softmax(self, scores: Array) -> Array:
        return torch.softmax(scores, dim=-1)

    def to_numpy(self, values: Array) -> Any:
        return values.detach().cpu().numpy()

    def from_numpy(self, values: Any) -> Array:
        return torch.from_numpy(values).to(self.device)

    def sync_point(self) -> bool:
        """Reading a value back from a GPU makes the host wait for it: search then checks less often."""
        return self.device.type != "cpu"
