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

from dataclasses import dataclass, field
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


@dataclass
class Layout:
    """What ``scan_header`` records: where the tensor infos end, ``general.alignment``, the token
    texts and the entry counts of the per-token arrays, and every tensor's (name, dims, type,
    offset relative to the data section)."""

    end: int = 0
    alignment: int | None = None
    tokens: list[bytes] | None = None
    per_token_counts: dict[str, int] = field(default_factory=dict)
    tensors: list[tuple[bytes, list[int], int, int]] = field(default_factory=list)
    n_kv: int = 0


_PER_TOKEN_KEYS = (b"tokenizer.ggml.scores", b"tokenizer.ggml.token_type")


def scan_header(path: Path, error=GGUFError) -> int:
    """Walk the header, metadata and tensor infos of ``path`` checking every count and length
    against the bytes that are really there; return where the tensor infos end.

    Cheap (no values are decoded), and it never trusts a size field: an array claiming more
    items than the rest of the file could hold is an error at once.
    """
    return read_layout(path, error).end


def read_layout(path: Path, error=GGUFError) -> Layout:
    """``scan_header``'s walk, keeping what the checks need (far cheaper than gguf-py's reader,
    which builds numpy objects for every token and merge of a 128k vocabulary)."""
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

        def text() -> bytes:
            n = u64()
            start = take(n)
            return bytes(mm[start:start + n])

        layout = Layout(n_kv=n_kv)

        # Every key-value takes at least 8 + 4 + 1 bytes, every tensor info 8 + 4 + 4 + 8.
        if n_kv * 13 > size - pos or n_tensors * 24 > size - pos:
            raise error(f"header claims {n_kv} metadata keys and {n_tensors} tensors, more than the file holds",
                        path)
        for _ in range(n_kv):
            key = text()
            vtype = u32()
            if vtype in _SCALAR_BYTES:
                start = take(_SCALAR_BYTES[vtype])
                if key == b"general.alignment":
                    layout.alignment = int.from_bytes(mm[start:pos], "little", signed=vtype in (5, 3, 1, 11))
            elif vtype == _STRING:
                string()
            elif vtype == _ARRAY:
                itype, count = u32(), u64()
                if key in _PER_TOKEN_KEYS:
                    layout.per_token_counts[key.decode()] = count
                if itype in _SCALAR_BYTES:
                    take(count * _SCALAR_BYTES[itype])
                elif itype == _STRING:
                    if count * 8 > size - pos:
                        raise error(f"an array claims {count} strings, more than the file holds", path)
                    if key == b"tokenizer.ggml.tokens":
                        layout.tokens = [text() for _ in range(count)]
                    else:
                        for _ in range(count):
                            string()
                else:
                    raise error(f"an array of value type {itype} is not supported", path)
            else:
                raise error(f"unknown metadata value type {vtype}", path)
        for _ in range(n_tensors):
            name = text()
            n_dims = u32()
            if not 1 <= n_dims <= _MAX_DIMS:
                raise error(f"a tensor has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)", path)
            dims = list(struct.unpack_from(f"<{n_dims}Q", mm, take(8 * n_dims)))
            qtype, offset = u32(), u64()
            layout.tensors.append((name, dims, qtype, offset))
        layout.end = pos
        return layout


def check_gguf(path: Path, expected: Sequence[ExpectedTensor] | None = None, *, validate_data: bool = True,
               error=GGUFError) -> GGUFSummary:
    """Check ``path``; raise ``error`` naming the first problem. ``expected``: the planned tensors
    in order (the writer's own check), else only self-consistency is checked."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise error("no such file", path)
    layout = read_layout(path, error)
    size = path.stat().st_size
    alignment = DEFAULT_ALIGNMENT if layout.alignment is None else layout.alignment
    if alignment <= 0 or alignment & (alignment - 1):
        raise error(f"general.alignment is {alignment}, not a power of two", path)
    data_offset = align(layout.end, alignment)

    tensors = layout.tensors
    if expected is not None and len(tensors) != len(expected):
        raise error(f"holds {len(tensors)} tensors, the plan has {len(expected)}", path)
    seen: set[str] = set()
    spans = []
    offset = data_offset
    for i, (raw_name, dims, type_number, relative) in enumerate(tensors):
        name = raw_name.decode("utf-8", "replace")
        if name in seen:
            raise error(f"tensor {name!r} appears twice", path)
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(type_number)
        except ValueError:
            raise error(f"tensor {name!r} has unknown type {type_number}", path) from None
        if qtype not in GGML_QUANT_SIZES:
            raise error(f"tensor {name!r} has type {qtype.name}, which has no block size", path)
        block, type_bytes = GGML_QUANT_SIZES[qtype]
        if not dims or any(d <= 0 for d in dims):
            raise error(f"tensor {name!r} has shape {dims}", path)
        n = 1
        for d in dims:
            n *= d
        if dims[0] % block:
            raise error(f"tensor {name!r}: rows of {dims[0]} are not whole {qtype.name} blocks of {block}", path)
        nbytes = n // block * type_bytes
        start = data_offset + relative
        if relative % alignment:
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
        spans.append((start, start + nbytes, name, qtype, dims[0] // block * type_bytes))
    spans.sort()
    for (_, end, name, *_), (start, _, other, *_) in zip(spans, spans[1:]):
        if start < end:
            raise error(f"tensors {name!r} and {other!r} overlap", path)
    if expected is not None and size != offset:
        raise error(f"file has {size} bytes, the plan {offset}", path)
    _check_vocab(layout, path, error)
    if validate_data:
        _validate_data(path, spans, error)
    data_bytes = sum(span[1] - span[0] for span in spans)
    return GGUFSummary(path=path, n_tensors=len(tensors), n_metadata=layout.n_kv,
                       data_bytes=data_bytes, file_bytes=size)


def _check_vocab(layout: Layout, path: Path, error) -> None:
    """The token list llama.cpp builds its vocabulary from: one entry per id, no text twice, up
    to a NUL (llama.cpp aborts the process on a duplicate rather than failing the load), scores and
    types, when present, of the same length."""
    if layout.tokens is None:
        return
    # llama.cpp reads each token as a C string: the text ends at the first NUL byte.
    texts = [t.split(b"\0", 1)[0] for t in layout.tokens]
    if len(set(texts)) != len(texts):
        seen: set[bytes] = set()
        twice = next(t for t in texts if t in seen or seen.add(t))
        raise error(f"tokenizer.ggml.tokens holds {twice[:40]!r} twice", path)
    for key, count in layout.per_token_counts.items():
        if count != len(texts):
            raise error(f"{key} has {count} entries for {len(texts)} tokens", path)


# Tensor data is validated this many bytes at a time (whole rows), so memory stays flat.
VALIDATE_CHUNK_BYTES = 32 << 20


def _validate_data(path: Path, spans, error) -> None:
    """ggml's check of every tensor's bytes, read in chunks of whole rows."""
    import numpy as np

    from .ggml import validate_row_data

    with open(path, "rb") as fh:
        for start, end, name, qtype, row_bytes in sorted(spans):
            step = max(row_bytes, VALIDATE_CHUNK_BYTES // row_bytes * row_bytes)
            fh.seek(start)
            for lo in range(start, end, step):
                data = np.frombuffer(fh.read(min(step, end - lo)), dtype=np.uint8)
                if not validate_row_data(qtype, data):
                    raise error(f"tensor {name!r} holds invalid {qtype.name} data (non-finite values or "
                                f"scales)", path)
