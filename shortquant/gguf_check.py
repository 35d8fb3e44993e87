"""Structural and data checks of a GGUF file, as llama.cpp's loader would make them.

Used twice: by the writer on every ``.part`` before it gets its final name (against what the
plan says the file must hold), and by ``shortquant verify`` / the eval stage on any file given
to us, downloads included. Checks: the header parses; tensor names are unique; every
tensor's offset is aligned, its size matches its shape and type, and it lies inside the file
without overlapping another; and each tensor's bytes pass ggml's own ``ggml_validate_row_data``
(finite scales and values, the check ``llama.cpp`` runs with ``--check-tensors``).

    >>> summary = check_gguf(Path("gguf/Model-Q8_0.gguf"))      # doctest: +SKIP
    >>> summary.n_tensors, summary.data_bytes                  # doctest: +SKIP
    (57, 5312512)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import GGUFError

DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class ExpectedTensor:
    name: str
    qtype: int
    nbytes: int


@dataclass(frozen=True)
class GGUFSummary:
    path: Path
    n_tensors: int
    n_metadata: int
    data_bytes: int
    file_bytes: int


def align(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)


def read_gguf_checked(path: Path, error=GGUFError):
    """gguf-py's reader over ``path``; anything it cannot parse is ``error`` in one line.

    The header is walked first (:func:`scan_header`): gguf-py believes the counts a file
    claims, and loops over an array that says it has 2^40 items for hours.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise error("no such file", path)
    scan_header(path, error)
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:   # gguf-py raises ValueError, IndexError, struct/numpy errors...
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise error(f"not a readable GGUF file ({first})", path) from None


# Bytes of each scalar GGUF value type (gguf.GGUFValueType numbers).
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4   # GGML_MAX_DIMS


def scan_header(path: Path, error=GGUFError) -> int:
    """Walk the header, metadata and tensor infos of ``path`` checking every count and length
    against the bytes that are really there; return where the tensor infos end.

    Cheap (no values are decoded), and it never trusts a size field: an array claiming more
    items than the rest of the file could hold is an error at once.
    """
    import mmap
    import struct

    size = Path(path).stat().st_size
    if size < 24:
        raise error(f"not a readable GGUF file (only {size} bytes)", path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise error(f"not a readable GGUF file (starts with {bytes(mm[:4])!r})", path)
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in (2, 3):
            raise error(f"GGUF version {version} is not supported (2 and 3 are; big-endian files are not)", path)
        pos = 24

        def take(n: int) -> int:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise error(f"header runs past the end of the file at byte {pos} (wants {n} more bytes)", path)
            start, pos = pos, pos + n
            return start

        def u32() -> int:
            return struct.unpack_from("<I", mm, take(4))[0]

        def u64() -> int:
            return struct.unpack_from("<Q", mm, take(8))[0]

        def string() -> None:
            take(u64())

        # Every key-value takes at least 8 + 4 + 1 bytes, every tensor info 8 + 4 + 4 + 8.
        if n_kv * 13 > size - pos or n_tensors * 24 > size - pos:
            raise error(f"header claims {n_kv} metadata keys and {n_tensors} tensors, more than the file holds",
                        path)
        for _ in range(n_kv):
            string()
            vtype = u32()
            if vtype in _SCALAR_BYTES:
                take(_SCALAR_BYTES[vtype])
            elif vtype == _STRING:
                string()
            elif vtype == _ARRAY:
                itype, count = u32(), u64()
                if itype in _SCALAR_BYTES:
                    take(count * _SCALAR_BYTES[itype])
                elif itype == _STRING:
                    if count * 8 > size - pos:
                        raise error(f"an array claims {count} strings, more than the file holds", path)
                    for _ in range(count):
                        string()
                else:
                    raise error(f"an array of value type {itype} is not supported", path)
            else:
                raise error(f"unknown metadata value type {vtype}", path)
        for _ in range(n_tensors):
            string()
            n_dims = u32()
            if not 1 <= n_dims <= _MAX_DIMS:
                raise error(f"a tensor has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)", path)
            take(8 * n_dims + 4 + 8)
        return pos


def check_gguf(path: Path, expected: Sequence[ExpectedTensor] | None = None, *, validate_data: bool = True,
               error=GGUFError) -> GGUFSummary:
    """Check ``path``; raise ``error`` naming the first problem. ``expected``: the planned tensors
    in order (the writer's own check), else only self-consistency is checked."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    reader = read_gguf_checked(path, error)
    size = path.stat().st_size
    alignment = _alignment(reader, path, error)
    if reader.data_offset % alignment:
        raise error(f"tensor data starts at byte {reader.data_offset}, not a multiple of {alignment}", path)

    tensors = list(reader.tensors)
    if expected is not None and len(tensors) != len(expected):
        raise error(f"holds {len(tensors)} tensors, the plan has {len(expected)}", path)
    seen: set[str] = set()
    spans = []
    offset = reader.data_offset
    for i, t in enumerate(tensors):
        name = str(t.name)
        if name in seen:
            raise error(f"tensor {name!r} appears twice", path)
        seen.add(name)
        qtype = GGMLQuantizationType(int(t.tensor_type))
        if qtype not in GGML_QUANT_SIZES:
            raise error(f"tensor {name!r} has type {qtype.name}, which has no block size", path)
        block, type_bytes = GGML_QUANT_SIZES[qtype]
        dims = [int(d) for d in t.shape]
        if not dims or any(d <= 0 for d in dims):
            raise error(f"tensor {name!r} has shape {dims}", path)
        n = 1
        for d in dims:
            n *= d
        if dims[0] % block:
            raise error(f"tensor {name!r}: rows of {dims[0]} are not whole {qtype.name} blocks of {block}", path)
        nbytes = n // block * type_bytes
        start = int(t.data_offset)
        if (start - reader.data_offset) % alignment:
            raise error(f"tensor {name!r} at byte {start} is not aligned to {alignment}", path)
        if start + nbytes > size:
            raise error(f"tensor {name!r} ends at byte {start + nbytes}, past the end of the file ({size})", path)
        if expected is not None:
            want = expected[i]
            if (name, int(qtype), nbytes) != (want.name, int(want.qtype), want.nbytes) or start != offset:
                raise error(f"tensor {i} is {name!r} ({qtype.name}, {nbytes} bytes at {start}); the plan has "
                            f"{want.name!r} ({GGMLQuantizationType(want.qtype).name}, {want.nbytes} bytes at "
                            f"{offset})", path)
            offset = align(start + nbytes, alignment)
        spans.append((start, start + nbytes, name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise error(f"tensors {name!r} and {other!r} overlap", path)
    if expected is not None and size != offset:
        raise error(f"file has {size} bytes, the plan {offset}", path)
    _check_vocab(reader, path, error)
    if validate_data:
        _validate_data(reader, path, error)
    data_bytes = sum(end - start for start, end, _ in spans)
    return GGUFSummary(path=path, n_tensors=len(tensors), n_metadata=len(reader.fields),
                       data_bytes=data_bytes, file_bytes=size)


def _alignment(reader, path: Path, error) -> int:
    field = reader.fields.get("general.alignment")
    if field is None:
        return DEFAULT_ALIGNMENT
    try:
        value = int(field.parts[field.data[0]][0])
    except (IndexError, TypeError, ValueError):
        raise error("general.alignment is not a number", path) from None
    if value <= 0 or value & (value - 1):
        raise error(f"general.alignment is {value}, not a power of two", path)
    return value


def _check_vocab(reader, path: Path, error) -> None:
    """The token list llama.cpp builds its vocabulary from: one entry per id, no text twice, up
    to a NUL (llama.cpp aborts the process on a duplicate rather than failing the load), scores and
    types, when present, of the same length."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    try:
        # llama.cpp reads each token as a C string: the text ends at the first NUL byte.
        texts = [bytes(tokens.parts[i]).split(b"\0", 1)[0] for i in tokens.data]
    except (IndexError, TypeError, ValueError):
        raise error("tokenizer.ggml.tokens is not a list of strings", path) from None
    if len(set(texts)) != len(texts):
        seen: set[bytes] = set()
        twice = next(t for t in texts if t in seen or seen.add(t))
        raise error(f"tokenizer.ggml.tokens holds {twice[:40]!r} twice", path)
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        field = reader.fields.get(key)
        if field is not None and len(field.data) != len(texts):
            raise error(f"{key} has {len(field.data)} entries for {len(texts)} tokens", path)


def _validate_data(reader, path: Path, error) -> None:
    """ggml's check of every tensor's bytes, straight from the file's memory map (no copy)."""
    import numpy as np
    from gguf import GGMLQuantizationType

    from .quant.ggml import validate_row_data

    for t in reader.tensors:
        data = t.data
        if not isinstance(data, np.ndarray) or not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        if not validate_row_data(GGMLQuantizationType(int(t.tensor_type)), data):
            raise error(f"tensor {str(t.name)!r} holds invalid {GGMLQuantizationType(int(t.tensor_type)).name} "
                        f"data (non-finite values or scales)", path)
