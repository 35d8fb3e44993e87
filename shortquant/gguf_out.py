"""Streaming GGUF writer: header, metadata and tensor infos first, then tensor data in order.

Sizes are known from the plan, so the header is written before any weight is produced and
each tensor's bytes go straight to disk as they are made. Everything is written under a
temporary name (``<final>.part``), locked while written (see :mod:`partfiles`), fsynced,
checked (:mod:`gguf_check`: the tensors the plan says, at the offsets it says, with data ggml
accepts) and renamed only then; any failure, Ctrl-C and SIGTERM included, removes it, so no
half-written or corrupt file ever carries the final name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import gguf
import numpy as np

from .errors import GGUFError, OutputError
from .gguf_check import ExpectedTensor, align, check_gguf
from .partfiles import PART_SUFFIX, PartLock
from .signals import signals_deferred
from .plan import FilePlan, MetaItem, ModelPlan


class GGUFFileWriter:
    """Writes one GGUF file for ``file_plan``; use as a context manager.

    >>> with GGUFFileWriter(plan, file_plan) as w:       # doctest: +SKIP
    ...     for t in plan.tensors:
    ...         w.write(t.name, encoded_bytes)     # whole tensor, or its rows in several pieces
    """

    def __init__(self, plan: ModelPlan, file_plan: FilePlan, extra_metadata: Sequence[MetaItem] = (),
                 validate_data: bool = True):
        self.plan, self.file_plan = plan, file_plan
        self.final_path = Path(file_plan.path)
        self.part_path = self.final_path.with_name(self.final_path.name + PART_SUFFIX)
        # a FilePlan may carry its own extra metadata (an optimized mix's record)
        self.extra_metadata = tuple(extra_metadata) + tuple(getattr(file_plan, "extra_metadata", ()))
        self.validate_data = validate_data   # off for weights the user allowed to be non-finite
        self._writer: gguf.GGUFWriter | None = None
        self._lock: PartLock | None = None
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
        writer = self._build_writer()
        self._pending = [(t.name, self.file_plan.tensor_nbytes(t)) for t in self.plan.tensors]
        try:
            with signals_deferred():   # no signal between creating the .part and owning it
                self._lock = PartLock.acquire(self.part_path)   # refused if another run writes this file
            _write_header(writer, self.part_path)
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write ({exc.strerror or exc})", self.part_path) from None
        except BaseException:   # Ctrl-C, SIGTERM: nothing left behind either
            self.abort()
            raise
        self._writer = writer
        self._pad()

    def _build_writer(self) -> gguf.GGUFWriter:
        """gguf-py's writer holding this file's metadata and tensor infos (nothing written yet)."""
        writer = gguf.GGUFWriter(None, self.plan.arch)
        keys = {item.key for item in self.plan.metadata}
        for item in self.plan.metadata + tuple(i for i in self.extra_metadata if i.key not in keys):
            writer.add_key_value(item.key, item.value, item.vtype, item.sub_type)
        writer.add_file_type(int(self.file_plan.file_type))
        if self.plan.tokenizer is not None:
            from .tokenizer import write_tokenizer

            write_tokenizer(writer, self.plan.tokenizer)
        for t in self.plan.tensors:
            qtype = self.file_plan.tensor_types[t.name]
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), self.file_plan.tensor_nbytes(t),
                                   raw_dtype=qtype)
        return writer

    def planned_size(self) -> int:
        """The exact size of the finished file in bytes, before anything is written: gguf-py
        serialises the header into memory; the tensor data follows from the plan."""
        writer = self._build_writer()
        header = _header_size(writer)
        alignment = writer.data_alignment
        return align(header, alignment) + sum(align(self.file_plan.tensor_nbytes(t), alignment)
                                              for t in self.plan.tensors)

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
            self._fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        except OSError as exc:   # ENOSPC, EFBIG (a file-size limit), EIO...
            raise OutputError(f"cannot write ({exc.strerror or exc})", self.part_path) from None
        due -= data.nbytes
        self._current = (name, due) if due else None
        if not due:
            self._pad()

    def commit(self) -> Path:
        if self._pending or self._current:
            raise RuntimeError(f"tensor data missing from {self.final_path}")
        fout = self._fout
        try:
            fout.flush()
            os.fsync(fout.fileno())
            self._writer.close()
        except OSError as exc:
            raise OutputError(f"cannot write ({exc.strerror or exc})", self.part_path) from None
        self._writer = None
        # Checked before it gets its final name: a file that fails never shows up as finished.
        check_gguf(self.part_path, self._expected(), validate_data=self.validate_data,
                   error=lambda message, path: GGUFError(f"the written file failed its check: {message}", path))
        os.replace(self.part_path, self.final_path)
        self._release()
        return self.final_path

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:   # the disk that failed the write may fail the flush too
                pass
            self._writer = None
        if self._lock is not None:   # only a .part we own is ours to remove
            self._unlink_part()
        self._release()

    # -- helpers ---------------------------------------------------------------------------
    def _expected(self) -> list[ExpectedTensor]:
        return [ExpectedTensor(t.name, int(self.file_plan.tensor_types[t.name]), self.file_plan.tensor_nbytes(t))
                for t in self.plan.tensors]

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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


def _write_header(writer: gguf.GGUFWriter, path: Path) -> None:
    """Header, metadata and tensor infos; the file is closed again if any of it fails."""
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    except BaseException:
        try:
            writer.close()
        except OSError:
            pass
        raise


def _header_size(writer: gguf.GGUFWriter) -> int:
    """Bytes of header, metadata and tensor infos, measured by letting gguf-py write them to memory."""
    import io

    from gguf.gguf_writer import WriterState

    buffer = io.BytesIO()
    writer.fout, writer.state = [buffer], WriterState.EMPTY   # what open_output_file would set up
    _write_header(writer, None)
    return buffer.tell()
