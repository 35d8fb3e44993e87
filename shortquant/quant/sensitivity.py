"""Measured quantization error of one weight tensor for every type it could get.

The error is that of ggml's real kernels: the tensor is quantized (with the importance matrix
the file will be written with) and decoded again, and the difference is weighted by how much
each weight matters for the layer's output:

    err = sum over rows r, columns c of  row_weight[r] * col_weight[c] * (W - Q(W))[r, c] ** 2

For a linear layer ``col_weight`` is the mean squared input activation of column ``c`` (what an
imatrix holds), so ``err`` is the expected squared change of the layer's output, E||dW x||^2,
under the imatrix's diagonal approximation. For the token embedding the rows are what matters:
``row_weight`` is how often each token occurs. :mod:`shortquant.quant.optimize` turns these
errors into predicted KL divergence with one measured coefficient per tensor.

>>> import numpy as np, gguf
>>> w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
>>> e = tensor_errors(w, [gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q8_0])
>>> e[gguf.GGMLQuantizationType.Q8_0] < e[gguf.GGMLQuantizationType.Q4_K]
True
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ..ggml import dequantize, quantize
from .types import IMATRIX_REQUIRED_TYPES, is_quantized

# Types the optimizer may give a tensor, smallest first: the K types and the two IQ types that
# need no importance matrix for rows of 256, the 32-block types otherwise.
CANDIDATES_256: tuple[T, ...] = (T.Q2_K, T.Q3_K, T.IQ3_S, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
CANDIDATES_32: tuple[T, ...] = (T.IQ4_NL, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)


def bits_per_weight(qtype: T) -> float:
    block, size = GGML_QUANT_SIZES[qtype]
    return size * 8 / block


def candidate_types(shape: Sequence[int], *, has_imatrix: bool, extra: Iterable[T] = (),
                    embedding_or_output: bool = False) -> list[T]:
    """Types ggml accepts for rows of ``shape[-1]`` values, smallest first.

    ``extra`` (the types standard mixes chose) are always included, so a standard mix is one
    of the solutions the optimizer can pick. Types llama.cpp refuses without an importance
    matrix are left out when there is none (embedding and output excepted, as llama.cpp does).

    >>> [t.name for t in candidate_types((64, 96), has_imatrix=False)]
    ['IQ4_NL', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0']
    """
    row = int(shape[-1])
    pool = CANDIDATES_256 if row % 256 == 0 else CANDIDATES_32 if row % 32 == 0 else ()
    out = set(pool) | set(extra)
    allowed = [t for t in out if row % GGML_QUANT_SIZES[t][0] == 0
               and (has_imatrix or embedding_or_output or t not in IMATRIX_REQUIRED_TYPES)]
    return sorted(allowed, key=lambda t: (bits_per_weight(t), t.name))


def roundtrip(data: np.ndarray, qtype: T, imatrix: np.ndarray | None = None,
              threads: int | None = None) -> np.ndarray:
    """``data`` (rows, cols) as llama.cpp will compute with it once stored as ``qtype``."""
    if not is_quantized(qtype):
        if qtype == T.F32:
            return np.array(data, dtype=np.float32)
        encoded = quantize(data, qtype, None, threads)
    else:
        encoded = quantize(data, qtype, imatrix, threads)
    return dequantize(encoded, qtype, data.shape[-1], threads).reshape(data.shape)


def weighted_error(data: np.ndarray, decoded: np.ndarray, col_weight: np.ndarray | None = None,
                   row_weight: np.ndarray | None = None) -> float:
    """sum of row_weight[r] * col_weight[c] * (data - decoded)[r, c]**2, in float64."""
    diff = np.square(data - decoded, dtype=np.float32)
    per_row = diff @ col_weight.astype(np.float32) if col_weight is not None else diff.sum(axis=1)
    per_row = per_row.astype(np.float64)
    return float(per_row @ row_weight if row_weight is not None else per_row.sum())


def tensor_errors(data: np.ndarray, types: Iterable[T], imatrix: np.ndarray | None = None,
                  col_weight: np.ndarray | None = None, row_weight: np.ndarray | None = None,
                  threads: int | None = None, keep: T | None = None):
    """{type: weighted error} of ``data`` for each type; with ``keep``, also the decoded
    tensor of that type: ``(errors, decoded)``."""
    data = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, data.shape[-1])
    errors, kept = {}, None
    for qtype in types:
        decoded = roundtrip(data, qtype, imatrix, threads)
        errors[qtype] = weighted_error(data, decoded, col_weight, row_weight)
        if qtype == keep:
            kept = decoded
    return (errors, kept) if keep is not None else errors
