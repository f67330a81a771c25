"""The few array operations search and its rules need, for NumPy here and for torch in `torch_ops`.

The search (`captioner.decoding.search`) and the logits rules
(`captioner.decoding.rules`) are written once against this interface, so the
PyTorch captioner (tensors on any device) and the torch-free ONNX runtime
(NumPy arrays) decode with the same code. Plain arithmetic, comparisons,
indexing, `.shape` and `.reshape` are used directly on the arrays: both
libraries give them the same meaning.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any


# The top-k over a long axis (a beam's whole vocabulary) looks first at blocks of this many values.
CHUNK = 64


def _chunked_candidates(values: np.ndarray, k: int) -> np.ndarray:
    """Indices holding the k largest values of each row (ties: the lower index first), more of them than k (some
    past the row's end).

    A partition of every row (NumPy's argpartition) cost as much as the decoder's step. Instead each block of
    `CHUNK` values gives its best (the largest, the first of equal ones: one pass, vectorised), and the k blocks
    with the best bests, ordered as the values are, hold the k best values: a value among the k best whose block
    is not among them would have k better values before it, one in each of those blocks. Those k blocks' values
    are the candidates.
    """
    length = values.shape[-1]
    rows = values.reshape(-1, length)
    whole = length // CHUNK * CHUNK
    blocks = rows[:, :whole].reshape(len(rows), -1, CHUNK)
    firsts = blocks.argmax(axis=-1) + np.arange(blocks.shape[1]) * CHUNK  # each block's best, as an index
    if whole < length:  # the last, shorter block
        firsts = np.concatenate([firsts, rows[:, whole:].argmax(axis=-1)[:, None] + whole], axis=1)
    bests = np.take_along_axis(rows, firsts, axis=1)
    chosen = np.lexsort((firsts, -bests), axis=-1)[:, :k]  # the blocks with the best bests, as the values order
    indices = ((chosen * CHUNK)[:, :, None] + np.arange(CHUNK)).reshape(*values.shape[:-1], -1)
    return indices  # past the end where the short block is chosen: `topk` drops those


class NumpyOps:
    """The operations on NumPy arrays (the exported runtime's search)."""

    long = np.int64
    float = np.float32

    def full(self, shape: tuple[int, ...], value: Any, dtype: Any) -> Array:
        return np.full(shape, value, dtype=dtype)

    def arange(self, count: int) -> Array:
        return np.arange(count, dtype=np.int64)

    def as_long(self, values: list[int]) -> Array:
        return np.asarray(values, dtype=np.int64)

    def as_float(self, array: Array) -> Array:
        return np.asarray(array, dtype=np.float32)

    def copy(self, values: Array) -> Array:
        return values.copy()

    def where(self, condition: Array, a: Array, b: Array) -> Array:
        return np.where(condition, a, b)

    def concat(self, arrays: list[Array], axis: int) -> Array:
        return np.concatenate(arrays, axis=axis)

    def log_softmax(self, scores: Array) -> Array:
        top = scores.max(axis=-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        shifted = scores - top
        with np.errstate(divide="ignore"):
            return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)

    def topk(self, values: Array, k: int) -> tuple[Array, Array]:
        """The k largest along the last axis, largest first (ties: the lower index first); no full sort of a long
        axis."""
        length = values.shape[-1]
        if k * CHUNK * 4 <= length:
            candidates = _chunked_candidates(values, k)
            inside = candidates < length
            picked = np.where(inside, np.take_along_axis(values, np.minimum(candidates, length - 1), axis=-1), -np.inf)
            candidates = np.where(inside, candidates, length)  # after every real value, -inf ones too
            order = np.lexsort((candidates, -picked), axis=-1)[..., :k]
            return np.take_along_axis(picked, order, axis=-1), np.take_along_axis(candidates, order, axis=-1)
        order = np.argsort(-values, axis=-1, kind="stable")[..., :k]  # a short axis: a stable sort is cheap
        return np.take_along_axis(values, order, axis=-1), order

    def argmax(self, values: Array) -> Array:
        return values.argmax(axis=-1)

    def take(self, values: Array, index: Array, axis: int) -> Array:
        """`values` gathered along `axis` at `index` (same number of dimensions; broadcasts trailing ones)."""
        return np.take_along_axis(values, index, axis=axis)

    def sort_key_order(self, keys: Array) -> Array:
        """Stable ascending order along the last axis."""
        return np.argsort(keys, axis=-1, kind="stable")

    def cumsum(self, values: Array) -> Array:
        return np.cumsum(values, axis=-1)

    def isfinite(self, values: Array) -> Array:
        return np.isfinite(values)

    def isin(self, values: Array, members: Array) -> Array:
        return np.isin(values, members)

    def count_tokens(self, tokens: Array, vocab: int) -> Array:
        """`(B, V)` counts of each token id among `tokens` `(B, n)`."""
        counts = np.zeros((tokens.shape[0], vocab), dtype=np.float32)
        np.add.at(counts, (np.arange(tokens.shape[0])[:, None], tokens), 1.0)
        return counts

    def all(self, values: Array) -> bool:
        return bool(values.all())

    def any_along(self, values: Array, axis: int) -> Array:
        return values.any(axis=axis)

    def all_along(self, values: Array, axis: int) -> Array:
        return values.all(axis=axis)

    def sum_along(self, values: Array, axis: int) -> Array:
        return values.sum(axis=axis)

    def max_along(self, values: Array, axis: int) -> Array:
        return values.max(axis=axis)

    def min_along(self, values: Array, axis: int) -> Array:
        return values.min(axis=axis)

    def sample(self, probabilities: Array, uniforms: Array) -> Array:
        """One index per row, drawn with the row's probabilities by inverse CDF at the row's uniform number in
        [0, 1) (`captioner.decoding.search.RowStreams`): the first index whose cumulative probability passes it."""
        cumulative = np.cumsum(probabilities.astype(np.float64), axis=-1)
        draws = np.asarray(uniforms, dtype=np.float64).reshape(-1, 1) * cumulative[:, -1:]
        return np.minimum((cumulative <= draws).sum(axis=-1), probabilities.shape[-1] - 1).astype(np.int64)

    def softmax(self, scores: Array) -> Array:
        return np.exp(self.log_softmax(scores))

    def to_numpy(self, values: Array) -> np.ndarray:
        return np.asarray(values)

    def from_numpy(self, values: np.ndarray) -> Array:
        return values

    def sync_point(self) -> bool:
        """Whether reading a value back costs a device synchronisation (it never does here)."""
        return False
