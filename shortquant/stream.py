"""The tensor stream: a plan's tensors as pieces of rows, read ahead of use, loaded as float32,
transformed for the GGUF layout; and a writer thread that keeps the disk busy meanwhile.

``export`` streams every piece into its files; ``quant.optimize`` loads whole tensors through the
same :func:`load_piece` for its probes. Both sit above this module; it imports neither.

>>> from shortquant.stream import Piece, load_piece                 # doctest: +SKIP
>>> rows = load_piece(checkpoint, Piece(tensor, 0, tensor.shape[0]))  # doctest: +SKIP
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import WeightError
from .plan import ModelPlan, TensorPlan
from .source.checkpoint import Checkpoint
from .source.experts import tensor_ref
from .transforms import apply_transform, row_unit


# Rows are read, converted and quantized in pieces of about this many values (64 MB as f32),
# so peak memory stays near one piece per output file, not one whole tensor.
CHUNK_VALUES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` of one planned tensor."""

    tensor: TensorPlan
    start: int
    stop: int

    @property
    def n_values(self) -> int:
        return (self.stop - self.start) * _row_length(self.tensor)


def _row_length(tensor: TensorPlan) -> int:
    """Values per row; a 1-D tensor is one row."""
    return tensor.n_elements // tensor.shape[0] if len(tensor.shape) > 1 else tensor.n_elements


def pieces(plan: ModelPlan, chunk_values: int | None = None) -> list[Piece]:
    chunk_values = chunk_values or CHUNK_VALUES
    out = []
    for tensor in plan.tensors:
        cols = _row_length(tensor)
        rows = tensor.n_elements // cols
        unit = row_unit(tensor)
        step = max(unit, chunk_values // cols // unit * unit)
        out.extend(Piece(tensor, lo, min(rows, lo + step)) for lo in range(0, rows, step))
    return out


def read_ahead(load: Callable[[int], np.ndarray], items: Sequence[Piece]) -> Iterator[tuple[Piece, np.ndarray]]:
    """Yield ``(items[i], load(i))``, loading item ``i + 1`` in a thread while ``i`` is used.

    ``load(i)`` may reuse the memory of ``load(i - 2)``: that result is no longer in use.
    """
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shortquant-read") as pool:
        future = pool.submit(load, 0)
        for i, item in enumerate(items):
            data = future.result()
            if i + 1 < len(items):
                future = pool.submit(load, i + 1)
            yield item, data


def load_piece(checkpoint: Checkpoint, piece: Piece, allow_nonfinite: bool = False,
               buffer: np.ndarray | None = None) -> np.ndarray:
    """Read rows of one source tensor as float32 (into ``buffer`` when given), transform them,
    refuse NaN/Inf unless allowed."""
    tensor = piece.tensor
    if tensor.computed:
        return tensor.computed_rows(piece.start, piece.stop)
    ref = tensor_ref(checkpoint.tensors, tensor)   # experts: a stacked view of their sources
    if tuple(ref.shape) != tuple(tensor.shape):   # FFN zero-padded to a K-quant width (--pad-ffn)
        return _load_padded(ref, piece, allow_nonfinite)
    try:
        data = ref.load_rows(piece.start, piece.stop, buffer) if len(tensor.shape) > 1 else ref.load()
    except OSError as exc:
        raise WeightError(f"cannot read tensor {tensor.source!r} ({exc})", ref.path) from None
    if not allow_nonfinite and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise WeightError(f"tensor {tensor.source!r} has {bad} NaN/Inf values "
                          f"(use --allow-nonfinite to export anyway)", ref.path)
    return apply_transform(tensor, data)


def _load_padded(ref, piece: Piece, allow_nonfinite: bool) -> np.ndarray:
    """Rows of a tensor planned larger than its source: the source values, zeros elsewhere."""
    tensor = piece.tensor
    out = np.zeros((piece.stop - piece.start, *tensor.shape[1:]) if len(tensor.shape) > 1 else tensor.shape,
                   dtype=np.float32)
    stop = min(piece.stop, ref.shape[0])
    if len(tensor.shape) == 1:
        out[:ref.shape[0]] = load_piece_rows(ref, 0, 0, allow_nonfinite, tensor)
    elif piece.start < stop:
        out[:stop - piece.start, :ref.shape[1]] = load_piece_rows(ref, piece.start, stop, allow_nonfinite, tensor)
    return out


def load_piece_rows(ref, start: int, stop: int, allow_nonfinite: bool, tensor) -> np.ndarray:
    try:
        data = ref.load_rows(start, stop) if len(tensor.shape) > 1 else ref.load()
    except OSError as exc:
        raise WeightError(f"cannot read tensor {tensor.source!r} ({exc})", ref.path) from None
    if not allow_nonfinite and not np.isfinite(data).all():
        raise WeightError(f"tensor {tensor.source!r} has {int((~np.isfinite(data)).sum())} NaN/Inf values "
                          f"(use --allow-nonfinite to export anyway)", ref.path)
    return data


class WriteBehind:
    """Runs writes in one background thread, in order, so the disk works while the next piece
    is quantized. At most one write is in flight; its error surfaces at the next call."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shortquant-write")
        self._last = None

    def submit(self, write: Callable[..., None], *args) -> None:
        self.wait()
        self._last = self._pool.submit(write, *args)

    def wait(self) -> None:
        last, self._last = self._last, None
        if last is not None:
            last.result()

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)
