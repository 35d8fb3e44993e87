"""A lazy handle to one source tensor: what it is and how to read it, nothing loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class TensorRef:
    name: str
    shape: tuple[int, ...]
    dtype: str                      # source dtype name, e.g. "BF16", "F16", "F32"
    path: Path                      # file holding the bytes
    reader: Callable[[int, int, np.ndarray | None], np.ndarray] = field(repr=False, compare=False)

    def load(self) -> np.ndarray:
        """The tensor as a float32 numpy array (a fresh copy)."""
        return self.reader(0, self.shape[0] if self.shape else 1, None)

    def load_rows(self, start: int, stop: int, buffer: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` (along the first axis) as float32; only those bytes are read.

        With ``buffer`` (a flat float32 array at least that large) the rows are widened into it
        and a view of it is returned: reusing one buffer saves a fresh allocation per piece.
        """
        return self.reader(start, stop, buffer)

    def raw_bytes(self) -> bytes:
        """The stored bytes as they are (source dtype, little-endian, C order), for copying a
        tensor unchanged (``prune --save-hf``)."""
        return self.reader.raw()

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))
