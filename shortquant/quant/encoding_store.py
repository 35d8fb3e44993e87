"""Encoded tensors kept for the writer on disk, not in memory.

The optimizer's verification quantizes every tensor of the mix it will write, and the file is then
made of those very bytes (nothing is quantized twice). Held in memory they would be the whole
file (4 GB for a 7B at Q4_K_M), more than the rest of the run needs; kept in a temporary file in
the output folder they cost one write and one read of it. The file is unlinked from the start, so
nothing is left behind however the run ends, and rows are read back with ``pread`` (no mapping:
mapped pages would count in the process's peak memory).

Example::

    store = EncodingStore(out_dir, capacity=4 << 30)
    store.put(("blk.0.attn_q.weight", T.Q4_K), rows)   # False when full: quantize again later
    store.rows(("blk.0.attn_q.weight", T.Q4_K))[0:16]  # the first 16 rows, read back
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Hashable

import numpy as np


class StoredRows:
    """An encoded tensor in an :class:`EncodingStore`: rows of bytes, read back when sliced."""

    def __init__(self, store: "EncodingStore", offset: int, shape: tuple[int, int]):
        self.store, self.offset, self.shape = store, offset, shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("stored rows are read back in contiguous ranges")
        out = np.empty((max(stop - start, 0), self.shape[1]), dtype=np.uint8)
        self.store.read_into(out, self.offset + start * self.shape[1])
        return out

    def read(self) -> np.ndarray:
        return self[:]


class EncodingStore:
    """Encoded tensors (uint8 rows) by key, in an unlinked temporary file in ``folder``, up to
    ``capacity`` bytes; a tensor that does not fit, or meets a full disk, is not kept."""

    def __init__(self, folder: Path, capacity: int):
        self.capacity = max(0, int(capacity))
        self.file = tempfile.TemporaryFile(dir=folder, prefix=".shortquant-encodings-") if self.capacity else None
        self.index: dict[Hashable, StoredRows] = {}
        self.size = 0

    def put(self, key: Hashable, rows: np.ndarray) -> bool:
        """Keep ``rows`` under ``key``; False when they do not fit (then nothing was kept)."""
        rows = np.ascontiguousarray(rows, dtype=np.uint8).reshape(len(rows), -1)
        if self.file is None or self.size + rows.nbytes > self.capacity:
            return False
        view, offset = memoryview(rows.reshape(-1)), self.size
        try:
            while view:
                done = os.pwrite(self.file.fileno(), view, offset)
                view, offset = view[done:], offset + done
        except OSError:   # a full disk: keep what is stored, store nothing more
            self.capacity = self.size
            return False
        self.index[key] = StoredRows(self, self.size, rows.shape)
        self.size += rows.nbytes
        return True

    def rows(self, key: Hashable) -> StoredRows | None:
        return self.index.get(key)

    def read_into(self, out: np.ndarray, offset: int) -> None:
        view = memoryview(out.reshape(-1))
        while view:
            got = os.preadv(self.file.fileno(), [view], offset)
            if got <= 0:
                raise OSError(f"the optimizer's temporary file ended at byte {offset}")
            view, offset = view[got:], offset + got

    def close(self) -> None:
        """Give the disk space back (the file has no name: closing it frees it)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        self.index.clear()
