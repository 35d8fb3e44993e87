"""Streaming GGUF writer: header, metadata and tensor infos first, then tensor data in order.

Sizes are known from the plan, so the header is written before any weight is produced and
each tensor's bytes go straight to disk as they are made. Everything is written under a
temporary name (``<final>.part``) that is fsynced and renamed only when complete; any
failure, Ctrl-C included, removes it, so no half-written file ever carries the final name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import gguf
import numpy as np

from .errors import OutputError
from .plan import FilePlan, MetaItem, ModelPlan

PART_SUFFIX = ".part"


class GGUFFileWriter:
    """Writes one GGUF file for ``file_plan``; use as a context manager.

    >>> with GGUFFileWriter(plan, file_plan) as w:       # doctest: +SKIP
    ...     for t in plan.tensors:
    ...         w.write(t.name, encoded_bytes)     # whole tensor, or its rows in several pieces
    """

    def __init__(self, plan: ModelPlan, file_plan: FilePlan, extra_metadata: Sequence[MetaItem] = ()):
        self.plan, self.file_plan = plan, file_plan
        self.final_path = Path(file_plan.path)
        self.part_path = self.final_path.with_name(self.final_path.name + PART_SUFFIX)
        self.extra_metadata = tuple(extra_metadata)
        self._writer: gguf.GGUFWriter | None = None
        self._pending: list[tuple[str, int]] = []
        self._current: tuple[str, int] | None = None   # tensor being written, bytes still due

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "GGUFFileWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def open(self) -> None:
        writer = gguf.GGUFWriter(None, self.plan.arch)
        for item in self.plan.metadata + self.extra_metadata:
            writer.add_key_value(item.key, item.value, item.vtype, item.sub_type)
        writer.add_file_type(int(self.file_plan.file_type))
        if self.plan.tokenizer is not None:
            from .tokenizer import write_tokenizer

            write_tokenizer(writer, self.plan.tokenizer)
        for t in self.plan.tensors:
            qtype = self.file_plan.tensor_types[t.name]
            nbytes = self.file_plan.tensor_nbytes(t)
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            self._pending.append((t.name, nbytes))
        try:
            writer.write_header_to_file(self.part_path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        except OSError as exc:
            writer.close()
            self._unlink_part()
            raise OutputError(f"cannot write ({exc.strerror or exc})", self.part_path) from None
        self._writer = writer
        self._pad()

    def write(self, name: str, data: np.ndarray) -> None:
        """Append encoded bytes of tensor ``name``: all of it, or the next rows of it.

        Tensors must come in the plan's order; a tensor is complete once its planned byte count
        has been written, and the padding to the next tensor follows automatically.
        """
        if self._current is None:
            self._current = self._pending.pop(0)
        expected_name, due = self._current
        if name != expected_name or data.nbytes > due:
            raise RuntimeError(f"writer expected {expected_name} ({due} bytes due), got {name} ({data.nbytes})")
        try:
            np.ascontiguousarray(data).tofile(self._fout)
        except OSError as exc:
            raise OutputError(f"cannot write ({exc.strerror or exc})", self.part_path) from None
        due -= data.nbytes
        self._current = (name, due) if due else None
        if not due:
            self._pad()

    def commit(self) -> Path:
        if self._pending or self._current:
            raise RuntimeError(f"tensor data missing from {self.final_path}")
        fout = self._fout
        fout.flush()
        os.fsync(fout.fileno())
        self._writer.close()
        self._writer = None
        os.replace(self.part_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._unlink_part()

    # -- helpers ---------------------------------------------------------------------------
    @property
    def _fout(self):
        return self._writer.fout[0]

    def _pad(self) -> None:
        fout = self._fout
        pad = -fout.tell() % self._writer.data_alignment
        if pad:
            fout.write(b"\0" * pad)

    def _unlink_part(self) -> None:
        try:
            self.part_path.unlink()
        except FileNotFoundError:
            pass
