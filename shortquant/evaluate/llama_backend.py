"""A GGUF model loaded through llama-cpp-python's low-level API, for measuring it.

Only what verification needs: tokenize a text the way llama.cpp does, decode a batch of
tokens at given positions and copy out the logits of the rows asked for, clear the KV
cache, and describe the build (backend, system info). llama.cpp's own log chatter is kept
out of the terminal but remembered, so a file llama.cpp refuses becomes one line naming
llama.cpp's reason.

Example::

    with LlamaModel("model-Q4_K_M.gguf", n_ctx=512) as model:
        tokens = model.tokenize("Once upon a time")
        logits = model.decode(tokens, outputs_from=0)   # (len(tokens), n_vocab) float32
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
from pathlib import Path

import numpy as np

from shortquant.errors import BackendError, EvalError

GGUF_MAGIC = b"GGUF"
_LOG_ERROR = 4  # ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT
_LOG_CONT = 5

_recent_log: collections.deque[tuple[int, str]] = collections.deque(maxlen=200)
_log_state = {"installed": False, "last_level": 0, "callback": None, "backend": False}


def _llama():
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendError(f"llama-cpp-python is not installed ({exc}); pip install llama-cpp-python")
    return llama_cpp


def _install_log_capture() -> None:
    """Route llama.cpp's log into a ring buffer (printed too when SHORTQUANT_LLAMA_LOG=1)."""
    if _log_state["installed"]:
        return
    llama_cpp = _llama()
    echo = os.environ.get("SHORTQUANT_LLAMA_LOG") == "1"

    @llama_cpp.llama_log_callback
    def _capture(level, text, user_data):
        message = text.decode("utf-8", errors="replace")
        if level == _LOG_CONT:
            level = _log_state["last_level"]
        _log_state["last_level"] = level
        _recent_log.append((level, message))
        if echo:
            import sys

            sys.stderr.write(message)

    _log_state["callback"] = _capture  # keep a reference: ctypes must not free it
    llama_cpp.llama_log_set(_capture, ctypes.c_void_p(0))
    if not _log_state["backend"]:
        llama_cpp.llama_backend_init()
        _log_state["backend"] = True
    _log_state["installed"] = True


def _llama_error() -> str:
    """llama.cpp's reason for the last failure (its error lines since the last clear), one line."""
    lines = [text for level, text in list(_recent_log) if level == _LOG_ERROR]
    text = " ".join(line.strip() for line in lines if line.strip())
    found = re.search(r"error loading model: (.*?)(?: llama_model_load_from_file_impl:|$)", text)
    if found:
        text = found.group(1)
    return (re.sub(r"\s+", " ", text).strip()
            or "llama.cpp gave no reason (set SHORTQUANT_LLAMA_LOG=1 to see its log)")


def check_gguf(path: str | Path) -> Path:
    """Raise EvalError unless ``path`` is a readable file that starts with the GGUF magic.

    Example::

        check_gguf("model-F16.gguf")
    """
    path = Path(path)
    if not path.is_file():
        raise EvalError("no such file", path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise EvalError(f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})", path)
    # Structure checked by us before llama.cpp's C++ loader sees it: a damaged file is one line.
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _checked_structure:
        from shortquant.gguf_check import check_gguf as check_structure

        check_structure(path, validate_data=False, error=EvalError)
        _checked_structure.add(key)
    return path


_checked_structure: set[tuple] = set()   # files already checked (path, size, mtime): once per run


def supports_gpu_offload() -> bool:
    """True when the installed llama-cpp-python was built with a GPU backend."""
    return bool(_llama().llama_supports_gpu_offload())


def system_info() -> str:
    """llama.cpp's feature line, e.g. 'CPU : SSE3 = 1 | AVX2 = 1 | ...'."""
    return _llama().llama_print_system_info().decode("utf-8", errors="replace").strip()


def backend_names() -> list[str]:
    """Backends compiled into the installed llama.cpp, e.g. ['CUDA', 'CPU']."""
    return re.findall(r"(?:^|\|)\s*([A-Za-z][A-Za-z0-9_]*) : ", system_info())


def build_info() -> dict:
    """Versions of the installed llama-cpp-python and the ggml it ships (version, commit)."""
    llama_cpp = _llama()
    info = {"llama_cpp_python": getattr(llama_cpp, "__version__", "unknown")}
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for candidate in sorted(lib_dir.glob("libggml-base*")) + sorted(lib_dir.glob("ggml-base*.dll")):
        try:
            lib = ctypes.CDLL(str(candidate))
            lib.ggml_version.restype = ctypes.c_char_p
            lib.ggml_commit.restype = ctypes.c_char_p
            info["ggml_version"] = lib.ggml_version().decode()
            info["ggml_commit"] = lib.ggml_commit().decode()
            break
        except (OSError, AttributeError):
            continue
    return info


class LlamaModel:
    """One GGUF file with one llama.cpp context; use as a context manager.

    ``n_ctx`` is the whole context; with ``n_seq_max`` > 1 it is split into that many
    independent sequences (KV streams), as llama-perplexity does to evaluate several chunks
    in one batch. ``n_batch``/``n_ubatch`` default to ``n_ctx``.

    Example::

        with LlamaModel("m.gguf", n_ctx=128, n_threads=2) as m:
            print(m.n_vocab, m.add_bos, m.tokenize("Hello")[:5])
    """

    def __init__(self, path: str | Path, *, n_ctx: int, n_batch: int | None = None,
                 n_ubatch: int | None = None, n_seq_max: int = 1, n_threads: int | None = None,
                 n_gpu_layers: int = 0, vocab_only: bool = False, eval_callback=None):
        self.path = check_gguf(path)
        llama_cpp = _llama()
        _install_log_capture()
        self._llama_cpp = llama_cpp
        self.model = None
        self.ctx = None
        self._batch = None

        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        model_params.vocab_only = vocab_only  # enough to tokenize, loads no weights
        _recent_log.clear()  # so a reason reported below is this file's
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self.model:
            raise EvalError(f"llama.cpp cannot load it: {_llama_error()}", self.path)

        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        self.n_ctx = n_ctx
        self.n_batch = n_batch or n_ctx
        self.n_seq_max = n_seq_max
        if vocab_only:
            return
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = self.n_batch
        ctx_params.n_ubatch = n_ubatch or self.n_batch
        ctx_params.n_seq_max = n_seq_max
        ctx_params.n_threads = self.n_threads
        ctx_params.n_threads_batch = self.n_threads
        ctx_params.no_perf = True
        if eval_callback is not None:  # a ggml_backend_sched_eval_callback (as llama-imatrix's)
            self._eval_callback = eval_callback  # kept referenced while the context lives
            ctx_params.cb_eval = eval_callback
            ctx_params.cb_eval_user_data = None
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            self.close()
            raise EvalError(f"llama.cpp cannot make a context for it: {_llama_error()}", self.path)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)  # one seq id per token

    # -- facts about the file ---------------------------------------------------------
    @property
    def n_params(self) -> int:
        return int(self._llama_cpp.llama_model_n_params(self.model))

    @property
    def tensor_bytes(self) -> int:
        """Bytes of all tensors (what llama.cpp divides by n_params for bits per weight)."""
        return int(self._llama_cpp.llama_model_size(self.model))

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = self._llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def file_type(self) -> int:
        """The llama_ftype number llama.cpp reports for the file."""
        return int(self._llama_cpp.llama_model_ftype(self.model))

    # -- work ---------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        """Token ids as llama.cpp's tokenizer makes them (BOS added when the vocab asks)."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        out = (self._llama_cpp.llama_token * capacity)()
        n = self._llama_cpp.llama_tokenize(self.vocab, data, len(data), out, capacity, add_special, False)
        if n < 0:  # buffer too small: llama.cpp says how many it needs
            capacity = -n
            out = (self._llama_cpp.llama_token * capacity)()
            n = self._llama_cpp.llama_tokenize(self.vocab, data, len(data), out, capacity, add_special, False)
        return np.frombuffer(out, dtype=np.int32, count=n).copy()

    def clear(self) -> None:
        """Forget the KV cache (each perplexity chunk starts fresh)."""
        self._llama_cpp.llama_memory_clear(self._llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, tokens, pos0: int = 0, outputs_from: int | None = None) -> np.ndarray | None:
        """Decode ``tokens`` of sequence 0 at positions pos0.. in one call.

        Returns the logits of batch rows >= ``outputs_from`` (0-based within ``tokens``);
        with ``outputs_from=None`` none are requested and None is returned (a prompt run).
        """
        n = len(tokens)
        outputs = np.zeros(n, dtype=bool)
        if outputs_from is not None:
            outputs[outputs_from:] = True
        return self.decode_batch(tokens, np.arange(pos0, pos0 + n), np.zeros(n, np.int32), outputs)

    def decode_batch(self, tokens, positions, seq_ids, outputs, copy: bool = True) -> np.ndarray | None:
        """One ``llama_decode`` of tokens with their positions and sequence ids.

        Returns the logits of the rows where ``outputs`` is true, in batch order, as a
        ``(n_outputs, n_vocab)`` float32 copy (None when no row asks for logits). With
        ``copy=False`` it is a view of llama.cpp's own output buffer instead: no copy of what
        may be hundreds of MB, but valid only until the next decode.
        """
        n = len(tokens)
        if n > self.n_batch:
            raise ValueError(f"{n} tokens do not fit a batch of {self.n_batch}")
        batch = self._batch
        batch.n_tokens = n
        np.ctypeslib.as_array(batch.token, shape=(n,))[:] = tokens
        np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = positions
        np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
        np.ctypeslib.as_array(batch.logits, shape=(n,))[:] = np.asarray(outputs, dtype=np.int8)
        for i, seq in enumerate(np.asarray(seq_ids).tolist()):
            batch.seq_id[i][0] = seq
        rc = self._llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise EvalError(f"llama_decode failed with code {rc}: {_llama_error()}", self.path)
        n_out = int(np.count_nonzero(outputs))
        if n_out == 0:
            return None
        ptr = self._llama_cpp.llama_get_logits(self.ctx)
        view = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
        return view.copy() if copy else view

    def synchronize(self) -> None:
        self._llama_cpp.llama_synchronize(self.ctx)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        if self._batch is not None:
            self._llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            self._llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self._llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort if a caller forgot the with-block
        try:
            self.close()
        except Exception:
            pass
