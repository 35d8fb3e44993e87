"""Lazy reading of one .safetensors file, with its header checked up front.

We parse the header ourselves (8-byte little-endian length, then JSON) so that a corrupt or
truncated file is reported as such before any weight is read. Rows are then read on demand
with plain ``read()`` into a reused per-thread buffer (cheaper than faulting in a fresh memory
map page by page) and widened to float32, so nothing beyond the rows asked for is held.
"""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import numpy as np

from ..errors import SourceError
from .tensor_ref import TensorRef

# safetensors dtype -> (numpy dtype used to view the bytes, bytes per element)
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # viewed as raw 16-bit words, widened to f32 on read
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_index(path: Path) -> dict[str, TensorRef]:
    """Every tensor in ``path`` as a lazy ``TensorRef``; raises SourceError on a bad file.

    >>> from shortquant.resources import demo_model
    >>> refs = read_safetensors_index(demo_model() / "model.safetensors")
    >>> refs["model.norm.weight"].shape
    (256,)
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError("truncated safetensors file (no header)", path)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER):
            raise SourceError(f"corrupt safetensors header (claims {header_len} bytes)", path)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"corrupt safetensors header ({exc})", path) from None

    data_start = 8 + header_len
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError):
            raise SourceError(f"corrupt safetensors header entry for {name!r}", path) from None
        # Whole non-negative numbers only (JSON allows 2.5, -3, true and 2**70; none is a size).
        if (not isinstance(shape, list) or not all(_is_size(d) for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(x) for x in offsets)):
            raise SourceError(f"corrupt safetensors header entry for {name!r}", path)
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise SourceError(f"tensor {name!r} has unsupported dtype {str(dtype_name)[:20]}", path)
        dtype = _DTYPES[dtype_name]
        shape = tuple(shape)
        begin, end = offsets
        n_values = 1
        for d in shape:          # Python ints: a claimed 2**70 values cannot overflow into a small size
            n_values *= d
        if end - begin != n_values * dtype.itemsize:
            raise SourceError(f"corrupt safetensors header: size of {name!r} does not match its shape", path)
        if data_start + end > size:
            raise SourceError(
                f"truncated safetensors file: {name!r} ends at byte {data_start + end}, file has {size}", path)
        refs[name] = TensorRef(name=name, shape=shape, dtype=dtype_name, path=path,
                               reader=_RowReader(path, data_start + begin, dtype, shape))
    return refs


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


class _RowReader:
    """Reads rows of one tensor from the file, widening to float32."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, shape

    def __call__(self, start: int, stop: int, buffer: np.ndarray | None = None) -> np.ndarray:
        row = int(np.prod(self.shape[1:], dtype=np.int64))
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        count = int(np.prod(shape, dtype=np.int64))
        raw = _staging(count * self.dtype.itemsize).view(self.dtype)[:count]
        with open(self.path, "rb", buffering=0) as f:   # read(), not mmap: no page fault per 4 KB
            f.seek(self.offset + start * row * self.dtype.itemsize)
            if f.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                raise OSError(f"short read of {count} values")
        out = np.empty(count, dtype=np.float32) if buffer is None else buffer[:count]
        if self.dtype == np.dtype("<u2"):  # bf16: the top half of an f32, widened in one pass
            np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            np.copyto(out, raw, casting="unsafe")
        return out.reshape(shape)

    def raw(self) -> bytes:
        size = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"short read of {size} bytes")
        return data


_local = threading.local()


def _staging(nbytes: int) -> np.ndarray:
    """A per-thread byte buffer for raw reads, grown as needed and then reused."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _local.buf = np.empty(max(nbytes, 1), dtype=np.uint8)
    return buf[:nbytes]
