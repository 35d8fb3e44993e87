"""Split a GGUF file into llama.cpp's split format, streamed.

The format is the one ``llama-gguf-split --split`` writes and llama.cpp loads natively when
given the first part:

- parts are named ``<prefix>-00001-of-0000N.gguf`` (1-based, five digits);
- the first part carries every metadata key of the original, then ``split.no``,
  ``split.count`` (both uint16) and ``split.tensors.count`` (int32, tensors in all parts);
  the other parts carry only those three keys;
- tensors keep their order; a new part starts when the next tensor's data (padded to the
  alignment) would push the current part's tensor data over the size limit. Metadata does not
  count against the limit, and a tensor larger than the limit gets a part of its own.

Key/value entries and tensor infos are copied byte for byte from the original (read with
gguf-py's reader); tensor data is streamed in chunks, so memory use stays flat. Parts are written
under ``.part`` names, fsynced, and renamed only once all are complete.

    >>> from shortquant.publish.split import split_gguf
    >>> split_gguf("model-Q8_0.gguf", "48G")          # doctest: +SKIP
    [PosixPath('model-Q8_0-00001-of-00002.gguf'), PosixPath('model-Q8_0-00002-of-00002.gguf')]
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from shortquant.errors import OutputError, PublishError
from shortquant.gguf_info import split_name
from shortquant.sizes import parse_size

GGUF_VERSION = 3
CHUNK = 64 * 1024 * 1024
_SPLIT_KEYS = (gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
               gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _kv_bytes(key: str, vtype: gguf.GGUFValueType, fmt: str, value) -> bytes:
    raw_key = key.encode("utf-8")
    return struct.pack(f"<Q{len(raw_key)}sI{fmt}", len(raw_key), raw_key, int(vtype), value)


@dataclass(frozen=True)
class _Part:
    path: Path
    header: bytes
    tensors: tuple          # gguf ReaderTensor, in file order
    data_bytes: int         # padded tensor data


def _plan(reader: gguf.GGUFReader, prefix: Path, max_bytes: int) -> list[_Part]:
    align = reader.alignment
    groups: list[list] = [[]]
    size = 0
    for tensor in reader.tensors:
        n = _pad(int(tensor.n_bytes), align)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += n
    count = len(groups)
    if count > 0xFFFF:
        raise PublishError(f"{count} parts is more than the split format allows; raise --split-max-size")

    copied_kv = [f for name, f in reader.fields.items()
                 if not name.startswith("GGUF.") and name not in _SPLIT_KEYS]
    alignment_kv = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    parts = []
    for index, tensors in enumerate(groups):
        kv = []
        if index == 0:
            kv += [b"".join(p.tobytes() for p in f.parts) for f in copied_kv]
        elif alignment_kv is not None:   # other parts must pad their data the same way
            kv.append(b"".join(p.tobytes() for p in alignment_kv.parts))
        kv.append(_kv_bytes(gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.GGUFValueType.UINT16, "H", index))
        kv.append(_kv_bytes(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, gguf.GGUFValueType.UINT16, "H", count))
        kv.append(_kv_bytes(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, gguf.GGUFValueType.INT32, "i",
                            len(reader.tensors)))
        infos = []
        offset = 0
        for tensor in tensors:
            # name length, name, n_dims, dims, type: verbatim; the data offset is new.
            infos.append(b"".join(p.tobytes() for p in tensor.field.parts[:5]))
            infos.append(struct.pack("<Q", offset))
            offset += _pad(int(tensor.n_bytes), align)
        header = struct.pack("<4sIQQ", b"GGUF", GGUF_VERSION, len(tensors), len(kv))
        header += b"".join(kv) + b"".join(infos)
        header += b"\0" * (_pad(len(header), align) - len(header))
        parts.append(_Part(split_name(prefix, index, count), header, tuple(tensors), offset))
    return parts


def split_gguf(path: str | Path, max_size: str | int, *, outdir: str | Path | None = None,
               progress: bool = True) -> list[Path]:
    """Split ``path`` into parts whose tensor data stays under ``max_size`` (``"48G"`` style).

    Parts are written next to the original (or into ``outdir``), which is left in place.
    Returns the part paths, first part first; a file that already fits is returned as is.

        >>> split_gguf("big-F16.gguf", "48G", progress=False)   # doctest: +SKIP
    """
    path = Path(path)
    max_bytes = parse_size(max_size, PublishError, "--split-max-size")
    if not path.is_file():
        raise PublishError("no such GGUF file", path)
    from shortquant.gguf_check import read_gguf_checked

    reader = read_gguf_checked(path, PublishError)   # counts checked first; one line for any damage
    if reader.byte_order != "I":
        raise PublishError("big-endian GGUF files are not supported", path)
    existing = reader.fields.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT)
    if existing is not None and int(existing.contents()) > 1:
        raise PublishError("already a split file; merge it first", path)

    target = Path(outdir) if outdir is not None else path.parent
    target.mkdir(parents=True, exist_ok=True)
    stem = path.name[:-5] if path.name.endswith(".gguf") else path.name
    parts = _plan(reader, target / stem, max_bytes)
    if len(parts) == 1:
        return [path]

    from shortquant.partfiles import PartLock
    from shortquant.signals import signals_deferred

    total = sum(p.data_bytes for p in parts)
    temp = [p.path.with_name(p.path.name + ".part") for p in parts]
    locks = []   # held while writing: another run's stale-file sweep leaves these alone
    try:
        for tmp in temp:
            with signals_deferred():   # created and owned at once: see PartLock.acquire
                locks.append(PartLock.acquire(tmp))
        from tqdm import tqdm

        with open(path, "rb") as src, tqdm(total=total, unit="B", unit_scale=True,
                                           desc=f"split {path.name}", disable=not progress) as bar:
            for part, tmp in zip(parts, temp):
                with open(tmp, "wb") as out:
                    out.write(part.header)
                    for tensor in part.tensors:
                        _copy(src, out, int(tensor.data_offset), int(tensor.n_bytes), bar)
                        pad = _pad(int(tensor.n_bytes), reader.alignment) - int(tensor.n_bytes)
                        out.write(b"\0" * pad)
                        bar.update(pad)
                    out.flush()
                    os.fsync(out.fileno())
        for part, tmp in zip(parts, temp):
            os.replace(tmp, part.path)
    except OSError as exc:
        raise OutputError(f"cannot write split files: {exc.strerror or exc}", target) from None
    finally:
        for tmp, lock in zip(temp, locks):
            tmp.unlink(missing_ok=True)
            lock.release()
    return [p.path for p in parts]


def _copy(src, out, offset: int, length: int, bar) -> None:
    src.seek(offset)
    left = length
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise OSError(f"unexpected end of file at byte {src.tell()}")
        out.write(chunk)
        left -= len(chunk)
        bar.update(len(chunk))
