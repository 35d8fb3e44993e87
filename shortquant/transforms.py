"""Tensor transforms between Hugging Face and llama.cpp layouts (each rule lives here once)."""

from __future__ import annotations

import numpy as np

from .plan import TensorPlan, Transform


def permute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder Q/K rows from HF's rotary layout to llama.cpp's.

    HF's LLaMA rotates the two halves of each head (``rotate_half``); llama.cpp's rope pairs
    neighbouring rows. Within each head, row ``i`` of the first half and row ``i`` of the second
    half become rows ``2i`` and ``2i+1``. For K the head count is the KV-head count (GQA).
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def row_unit(tensor: TensorPlan) -> int:
    """The smallest row count a transform can work on alone (one head for the permutation)."""
    if tensor.transform in (Transform.PERMUTE_Q, Transform.PERMUTE_K):
        return tensor.shape[0] // tensor.heads
    return 1


def apply_transform(tensor: TensorPlan, rows: np.ndarray) -> np.ndarray:
    """Transform whole rows of ``tensor`` (a slice of whole heads when permuting)."""
    if tensor.transform is Transform.NONE:
        return rows
    if tensor.transform in (Transform.PERMUTE_Q, Transform.PERMUTE_K):
        return np.ascontiguousarray(permute_rotary(rows, rows.shape[0] // row_unit(tensor)))
    if tensor.transform is Transform.ADD_ONE:   # llama.cpp's LayerNorm multiplies by the weight itself
        return rows + np.float32(1)
    raise ValueError(f"unknown transform {tensor.transform}")


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`permute_rotary`: llama.cpp's Q/K row order back to HF's."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return (weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def undo_transform(tensor: TensorPlan, rows: np.ndarray) -> np.ndarray:
    """Whole rows of ``tensor`` as written (llama.cpp's layout) back in the source's layout."""
    if tensor.transform is Transform.NONE:
        return rows
    if tensor.transform in (Transform.PERMUTE_Q, Transform.PERMUTE_K):
        return np.ascontiguousarray(unpermute_rotary(rows, rows.shape[0] // row_unit(tensor)))
    if tensor.transform is Transform.ADD_ONE:
        return rows - np.float32(1)
    raise ValueError(f"unknown transform {tensor.transform}")
