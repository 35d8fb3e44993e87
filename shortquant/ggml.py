"""ggml's own quantization kernels, through ctypes.

The quantizers live in the ``libggml-base`` library that llama-cpp-python ships in its ``lib/``
folder. Calling them (rather than re-implementing the arithmetic) is what makes our blocks
byte-for-byte what ``llama-quantize`` writes. ctypes releases the GIL during each call, so rows
are split across a thread pool the way llama.cpp splits them across its workers; every row is
quantized independently, so the split never changes the bytes.

>>> import numpy as np, gguf
>>> w = np.random.default_rng(0).standard_normal((4, 256), dtype=np.float32)
>>> quantize(w, gguf.GGMLQuantizationType.Q8_0).shape   # 8 blocks of 34 bytes per row
(4, 272)
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import BackendError, QuantError

# Functions we need; a libggml-base without any of them is too old for us.
_REQUIRED_SYMBOLS = (
    "ggml_quantize_init",
    "ggml_quantize_requires_imatrix",
    "ggml_quantize_chunk",
    "ggml_validate_row_data",
    "ggml_row_size",
    "ggml_blck_size",
    "ggml_type_size",
    "ggml_type_name",
)

# Below this many values per task, thread hand-off costs more than it saves (llama.cpp uses 32*512).
_MIN_CHUNK_VALUES = 32 * 512

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()
_initialised: set[GGMLQuantizationType] = set()
_checked: set[GGMLQuantizationType] = set()


def _library_names() -> tuple[str, ...]:
    # The soname file first: it is the one libllama loads, so llama.cpp and we then share one
    # copy of ggml (and its lookup tables, which take seconds to build for IQ1/IQ2 types).
    if sys.platform == "darwin":
        return ("libggml-base.0.dylib", "libggml-base.dylib")
    if sys.platform == "win32":
        return ("ggml-base.dll",)
    return ("libggml-base.so.0", "libggml-base.so")


def library_path() -> Path:
    """Where the ``libggml-base`` of the installed llama-cpp-python is.

    Found from the package's location without importing it (importing loads libllama too).
    ``SHORTQUANT_GGML_LIB`` overrides the search.
    """
    override = os.environ.get("SHORTQUANT_GGML_LIB")
    if override:
        path = Path(override)
        if not path.is_file():
            raise BackendError("SHORTQUANT_GGML_LIB does not name a file", path)
        return path
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            "llama-cpp-python is not installed; install it (pip install llama-cpp-python) "
            "to quantize with ggml's kernels"
        )
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    for name in _library_names():
        if (lib_dir / name).is_file():
            return lib_dir / name
    raise BackendError(
        f"llama-cpp-python has no {_library_names()[0]} (a build older than 0.3 or a broken install); "
        "reinstall llama-cpp-python >= 0.3",
        lib_dir,
    )


def _load() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        path = library_path()
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise BackendError(f"cannot load ggml: {exc}", path) from exc
        missing = [name for name in _REQUIRED_SYMBOLS if not hasattr(lib, name)]
        if missing:
            raise BackendError(
                f"this ggml is too old (lacks {', '.join(missing)}); upgrade llama-cpp-python", path
            )
        c_type = ctypes.c_int  # enum ggml_type
        lib.ggml_quantize_init.argtypes = [c_type]
        lib.ggml_quantize_init.restype = None
        lib.ggml_quantize_requires_imatrix.argtypes = [c_type]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_chunk.argtypes = [
            c_type, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_validate_row_data.argtypes = [c_type, ctypes.c_void_p, ctypes.c_size_t]
        lib.ggml_validate_row_data.restype = ctypes.c_bool
        lib.ggml_row_size.argtypes = [c_type, ctypes.c_int64]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_blck_size.argtypes = [c_type]
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_type_size.argtypes = [c_type]
        lib.ggml_type_size.restype = ctypes.c_size_t
        lib.ggml_type_name.argtypes = [c_type]
        lib.ggml_type_name.restype = ctypes.c_char_p
        _lib = lib
        return lib


def _check_type(qtype: GGMLQuantizationType) -> ctypes.CDLL:
    """Load ggml and make sure it numbers and sizes ``qtype`` the way gguf-py does."""
    lib = _load()
    if qtype in _checked:
        return lib
    if qtype not in GGML_QUANT_SIZES:
        raise QuantError(f"{qtype.name} is not a type ggml can quantize to")
    name = lib.ggml_type_name(int(qtype))
    block, type_bytes = GGML_QUANT_SIZES[qtype]
    if (
        name is None
        or name.decode().upper() != qtype.name
        or lib.ggml_blck_size(int(qtype)) != block
        or lib.ggml_type_size(int(qtype)) != type_bytes
    ):
        raise BackendError(
            f"the installed ggml does not know {qtype.name} as gguf-py does "
            "(llama-cpp-python too old or too new for this gguf); upgrade both"
        )
    _checked.add(qtype)
    return lib


def quantize_init(qtype: GGMLQuantizationType) -> None:
    """Build ggml's lookup tables for ``qtype`` (once per type; IQ types need it)."""
    lib = _check_type(qtype)
    with _lib_lock:
        if qtype not in _initialised:
            lib.ggml_quantize_init(int(qtype))
            _initialised.add(qtype)


def block_size(qtype: GGMLQuantizationType) -> int:
    """Values per block (32 for Q8_0, 256 for the K and most IQ types, 1 for floats)."""
    return GGML_QUANT_SIZES[qtype][0]


def row_size(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    """Bytes of one quantized row of ``n_per_row`` values (ggml_row_size).

    >>> import gguf; row_size(gguf.GGMLQuantizationType.Q4_K, 4096)
    2304
    """
    return int(_check_type(qtype).ggml_row_size(int(qtype), int(n_per_row)))


def kernel_requires_imatrix(qtype: GGMLQuantizationType) -> bool:
    """True when ggml's kernel itself cannot run without an importance matrix (it would abort)."""
    return bool(_check_type(qtype).ggml_quantize_requires_imatrix(int(qtype)))


def validate_row_data(qtype: GGMLQuantizationType, data: np.ndarray) -> bool:
    """ggml's own check of quantized bytes (finite scales, valid codes)."""
    lib = _check_type(qtype)
    buf = np.ascontiguousarray(data)
    return bool(lib.ggml_validate_row_data(int(qtype), buf.ctypes.data, buf.nbytes))


def default_threads() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(n_threads: int) -> ThreadPoolExecutor:
    """One long-lived pool per thread count: starting threads for every tensor piece adds up."""
    with _lib_lock:
        if n_threads not in _pools:
            _pools[n_threads] = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="ggml-quantize")
        return _pools[n_threads]


def quantize(
    data: np.ndarray,
    qtype: GGMLQuantizationType,
    imatrix: np.ndarray | None = None,
    threads: int | None = None,
    out: np.ndarray | None = None,
    validate: bool = True,
) -> np.ndarray:
    """Quantize float32 rows to ``qtype`` exactly as llama.cpp does.

    ``data`` is (rows, cols) or 1-D (one row), or (experts, rows, cols); ``cols`` is the row
    length and must be a multiple of the type's block size. ``imatrix`` holds one importance
    value per column, or one row of them per expert (experts, cols), as llama.cpp uses them.
    Returns uint8 of shape (rows, row_size(qtype, cols)): the bytes llama.cpp writes for the
    tensor. F16 and BF16 are converted by ggml (its rounding); F32 is returned as bytes.
    ``out`` may be a preallocated uint8 array of that shape to write into. ``validate=False``
    skips ggml's check of the result (for weights the user allowed to be non-finite).

    >>> import numpy as np, gguf
    >>> w = np.ones((2, 64), dtype=np.float32)
    >>> quantize(w, gguf.GGMLQuantizationType.F16).view(np.float16)[0, :3]
    array([1., 1., 1.], dtype=float16)
    """
    qtype = GGMLQuantizationType(qtype)
    src = np.ascontiguousarray(data, dtype=np.float32)
    if src.ndim == 1:
        src = src.reshape(1, -1)
    if src.ndim == 3 and imatrix is not None and np.ndim(imatrix) == 2 and len(imatrix) > 1:
        if len(imatrix) != len(src):
            raise QuantError(f"importance matrix has {len(imatrix)} rows for {len(src)} experts")
        out = out if out is not None else np.empty((src.shape[0] * src.shape[1], row_size(qtype, src.shape[2])),
                                                   dtype=np.uint8)
        rows = src.shape[1]
        for e in range(len(src)):   # each expert with its own importance, as llama.cpp does
            quantize(src[e], qtype, imatrix[e], threads, out[e * rows:(e + 1) * rows], validate)
        return out
    if src.ndim == 3:
        src = src.reshape(-1, src.shape[-1])
    if src.ndim != 2:
        raise QuantError(f"can only quantize 1-D or 2-D arrays, got shape {tuple(data.shape)}")
    rows, cols = src.shape
    lib = _check_type(qtype)
    block = block_size(qtype)
    if cols % block:
        raise QuantError(
            f"row length {cols} is not a multiple of {block}, the block size of {qtype.name}"
        )
    nbytes_row = row_size(qtype, cols)
    if out is None:
        out = np.empty((rows, nbytes_row), dtype=np.uint8)
    elif out.shape != (rows, nbytes_row) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 of shape {(rows, nbytes_row)}")
    if qtype == GGMLQuantizationType.F32:
        out[...] = src.view(np.uint8)
        return out

    imatrix_ptr = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.size != cols:
            raise QuantError(f"importance matrix has {imatrix.size} values for rows of {cols}")
        if not np.isfinite(imatrix).all():
            raise QuantError("importance matrix has non-finite values")
        imatrix_ptr = imatrix.ctypes.data
    elif kernel_requires_imatrix(qtype):
        raise QuantError(
            f"{qtype.name} needs an importance matrix; make one with `shortquant imatrix` "
            "and pass it with --imatrix"
        )
    quantize_init(qtype)

    src_ptr, dst_ptr = src.ctypes.data, out.ctypes.data
    row_bytes_src = cols * 4

    def run(first: int, count: int) -> bool:
        dst = dst_ptr + first * nbytes_row
        written = lib.ggml_quantize_chunk(
            int(qtype), src_ptr + first * row_bytes_src, dst, 0, count, cols, imatrix_ptr
        )
        return written == count * nbytes_row and (
            not validate or lib.ggml_validate_row_data(int(qtype), dst, written))

    n_threads = threads or default_threads()
    rows_per_task = max(1, -(-_MIN_CHUNK_VALUES // cols))
    # Many small tasks per thread: every call ends at a barrier, and the last task decides
    # when; short tasks keep the other threads' idle tail short.
    rows_per_task = max(rows_per_task, -(-rows // (n_threads * 16)))
    tasks = [(r, min(rows_per_task, rows - r)) for r in range(0, rows, rows_per_task)]
    if n_threads == 1 or len(tasks) == 1:
        ok = all(run(first, count) for first, count in tasks)
    else:
        ok = all(_pool(n_threads).map(lambda t: run(*t), tasks))
    if not ok:
        raise QuantError(
            f"ggml rejected the {qtype.name} data it produced (non-finite or out-of-range weights?)"
        )
    return out


class _TypeTraits(ctypes.Structure):
    # ggml.h's struct ggml_type_traits (unchanged since ggml split the CPU backend out, 2024)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_to_float: dict[GGMLQuantizationType, object] = {}


def _to_float_fn(qtype: GGMLQuantizationType):
    """ggml's own decoder of ``qtype`` blocks (its type traits' ``to_float``)."""
    lib = _check_type(qtype)
    with _lib_lock:
        if qtype not in _to_float:
            if not hasattr(lib, "ggml_get_type_traits"):
                raise BackendError("this ggml lacks ggml_get_type_traits; upgrade llama-cpp-python")
            lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
            lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
            traits = lib.ggml_get_type_traits(int(qtype)).contents
            if not traits.to_float or traits.blck_size != block_size(qtype):
                raise BackendError(f"the installed ggml cannot decode {qtype.name}")
            _to_float[qtype] = _TO_FLOAT(traits.to_float)
        return _to_float[qtype]


def dequantize(encoded: np.ndarray, qtype: GGMLQuantizationType, n_per_row: int,
               threads: int | None = None) -> np.ndarray:
    """Decode rows quantized by :func:`quantize` back to float32 with ggml's own kernels.

    ``encoded``: uint8 (rows, row_size(qtype, n_per_row)). Returns float32 (rows, n_per_row):
    the values llama.cpp computes with.

    >>> import numpy as np, gguf
    >>> w = np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256)
    >>> q = quantize(w, gguf.GGMLQuantizationType.Q8_0)
    >>> float(np.abs(dequantize(q, gguf.GGMLQuantizationType.Q8_0, 256) - w).max()) < 0.01
    True
    """
    qtype = GGMLQuantizationType(qtype)
    src = np.ascontiguousarray(encoded, dtype=np.uint8)
    rows = src.shape[0] if src.ndim == 2 else 1
    nbytes_row = row_size(qtype, n_per_row)
    if src.size != rows * nbytes_row:
        raise QuantError(f"{src.size} bytes are not {rows} rows of {n_per_row} {qtype.name} values")
    if qtype == GGMLQuantizationType.F32:
        return src.view(np.float32).reshape(rows, n_per_row).copy()
    decode = _to_float_fn(qtype)
    out = np.empty((rows, n_per_row), dtype=np.float32)
    src_ptr, dst_ptr = src.ctypes.data, out.ctypes.data
    rows_per_task = max(1, -(-_MIN_CHUNK_VALUES // n_per_row))

    def run(first: int) -> None:
        count = min(rows_per_task, rows - first)
        decode(src_ptr + first * nbytes_row, dst_ptr + first * n_per_row * 4, count * n_per_row)

    starts = range(0, rows, rows_per_task)
    n_threads = threads or default_threads()
    if n_threads == 1 or len(starts) == 1:
        for first in starts:
            run(first)
    else:
        list(_pool(n_threads).map(run, starts))
    return out
