"""An importance matrix computed by llama.cpp's own evaluation of a GGUF file.

llama-imatrix asks the graph scheduler to call back after every matrix product and sums the
squares of the activations that meet each ``blk.*`` weight. llama-cpp-python exposes the same
callback (``cb_eval`` in the context parameters), so we run that collection from Python on
llama.cpp's forward pass: the numbers are llama.cpp's, at llama.cpp's speed, and the tensor
names are the GGUF's own. The text is chunked and batched as llama-imatrix does (chunks of
``ctx`` tokens starting with BOS, ``n_batch // ctx`` chunks per decode, every token an
output, so the last block's FFN sees every token).

Example::

    tokens = gguf_tokens("model-F16.gguf", open("calib.txt").read())
    im = compute_imatrix_gguf("model-F16.gguf", tokens, ctx=512, chunks=100)
    write_imatrix("model.imatrix.gguf", im)
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import BackendError, QuantError
from .imatrix import MIN_CTX, Imatrix, check_finite, chunk_tokens

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type, padding
SPLIT_ROWS = 64  # below this many rows a product is summed on one thread


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml.h (checked against the library before use)."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def _ggml() -> ctypes.CDLL:
    from ..ggml import library_path

    lib = ctypes.CDLL(str(library_path()))
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_void_p
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    if lib.ggml_tensor_overhead() != GGML_OBJECT_SIZE + ctypes.sizeof(GgmlTensor):
        raise BackendError("the installed llama.cpp lays out ggml tensors differently from what shortquant "
                           "knows; compute the imatrix from the Hugging Face folder (torch) instead")
    return lib


def _op_number(lib, name: bytes) -> int:
    for number in range(200):  # the op enum is a few dozen long; MUL_MAT is early in it
        if lib.ggml_op_name(number) == name:
            return number
    raise BackendError(f"this ggml has no {name.decode()} operation")


def weight_name(raw: bytes) -> str:
    """A weight's name without a backend's prefix and suffix (``CUDA0#blk.0.attn_k.weight#0``)."""
    name = raw.decode("utf-8", errors="replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


class _Collector:
    """The ``cb_eval`` callback: sums of squared activations per weight, as llama-imatrix."""

    def __init__(self):
        self.lib = _ggml()
        self.mul_mat = _op_number(self.lib, b"MUL_MAT")
        self.mul_mat_id = _op_number(self.lib, b"MUL_MAT_ID")
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None
        self.checked_layout = False
        self.pool: ThreadPoolExecutor | None = None
        self.threads = 1
        self._scratch = b""
        self.callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)(self._call)

    def use_threads(self, threads: int) -> None:
        self.threads = threads
        if threads > 1 and self.pool is None:
            self.pool = ThreadPoolExecutor(threads, thread_name_prefix="imatrix")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def _call(self, pointer, ask, _user_data) -> bool:
        try:
            tensor = GgmlTensor.from_address(pointer)
            if ask:
                return self._wanted(tensor)
            self._collect(tensor)
            return True
        except BaseException as exc:  # an exception must not cross back into C
            self.error = self.error or exc
            return False

    def _wanted(self, tensor: GgmlTensor) -> bool:
        if tensor.op == self.mul_mat_id:   # experts: every routed product, as llama-imatrix
            return weight_name(tensor.src[0].contents.name).startswith("blk.")
        if tensor.op != self.mul_mat:
            return False
        src0, src1 = tensor.src[0].contents, tensor.src[1].contents
        if src1.ne[1] < MIN_CTX or src1.type != GGML_TYPE_F32:  # llama-imatrix skips these too
            return False
        if not self.checked_layout:  # the name field must be where ggml_get_name finds it
            if self.lib.ggml_get_name(ctypes.addressof(src0)) != ctypes.addressof(src0) + GgmlTensor.name.offset:
                raise BackendError("the installed llama.cpp lays out ggml tensors differently from what "
                                   "shortquant knows; compute the imatrix from the Hugging Face folder instead")
            self.checked_layout = True
        return weight_name(src0.name).startswith("blk.")

    def _collect(self, tensor: GgmlTensor) -> None:
        src0, src1 = tensor.src[0].contents, tensor.src[1].contents
        name = weight_name(src0.name)
        if tensor.op == self.mul_mat_id:
            return self._collect_experts(name, int(src0.ne[2]), src1, tensor.src[2].contents)
        ne0 = int(src1.ne[0])
        rows = self._rows(src1)
        total = self._sum_squares(rows)
        acc = self.sums.get(name)
        if acc is None:
            acc = self.sums[name] = np.zeros(ne0, dtype=np.float64)
        elif acc.size != ne0:
            raise QuantError(f"inconsistent activation width for {name} ({acc.size} vs {ne0})")
        acc += total
        self.counts[name] = self.counts.get(name, 0) + len(rows)

    def _collect_experts(self, name: str, n_expert: int, src1: GgmlTensor, ids: GgmlTensor) -> None:
        """A routed product (MUL_MAT_ID): each token's activations, for each expert it was routed
        to, summed into that expert's row; counts per expert (llama-imatrix's 3-D entries)."""
        x = self._array(src1, ctypes.c_float)[0]        # (tokens, n_used or 1, cols)
        chosen = self._array(ids, ctypes.c_int32, copy=True)[0, 0]   # (tokens, n_used)
        if chosen.shape[0] != x.shape[0]:
            raise QuantError(f"{name}: {chosen.shape[0]} routed tokens but {x.shape[0]} activation rows")
        if chosen.size and (chosen.min() < 0 or chosen.max() >= n_expert):
            raise QuantError(f"{name}: llama.cpp routed to an expert outside 0..{n_expert - 1}")
        slots = np.arange(chosen.shape[1]) % x.shape[1]  # gate/up see one row per token, down one per slot
        squares = np.square(x[:, slots, :], dtype=np.float64).reshape(-1, x.shape[2])
        acc = self.sums.get(name)
        if acc is None:
            acc = self.sums[name] = np.zeros((n_expert, x.shape[2]), dtype=np.float64)
            self.counts[name] = np.zeros(n_expert, dtype=np.int64)
        elif acc.shape != (n_expert, x.shape[2]):
            raise QuantError(f"inconsistent activation shape for {name} ({acc.shape} vs {(n_expert, x.shape[2])})")
        np.add.at(acc, chosen.reshape(-1), squares)
        self.counts[name] += np.bincount(chosen.reshape(-1), minlength=n_expert)

    def _rows(self, src1: GgmlTensor) -> np.ndarray:
        """src1 as (rows, cols) float32, read in place (copied off a device buffer if need be)."""
        return self._array(src1, ctypes.c_float).reshape(-1, int(src1.ne[0]))

    def _array(self, t: GgmlTensor, ctype, copy: bool = False) -> np.ndarray:
        """A ggml tensor as a numpy array of shape ne[::-1] over its data (host memory read in
        place unless ``copy``; a device buffer copied off)."""
        ne, nb = [int(v) for v in t.ne], [int(v) for v in t.nb]
        if nb[0] != ctypes.sizeof(ctype):
            raise QuantError("llama.cpp handed over a tensor whose rows are not packed")
        span = sum((n - 1) * b for n, b in zip(ne, nb)) + nb[0]  # first to last element, in bytes
        address = t.data
        if copy or not self.lib.ggml_backend_buffer_is_host(t.buffer):
            scratch = ctypes.create_string_buffer(span) if copy else self._grow(span)
            if self.lib.ggml_backend_buffer_is_host(t.buffer):
                ctypes.memmove(scratch, t.data, span)
            else:
                self.lib.ggml_backend_tensor_get(ctypes.addressof(t), scratch, 0, span)
            address = ctypes.addressof(scratch)
        flat = np.ctypeslib.as_array((ctype * (span // nb[0])).from_address(address))
        out = np.lib.stride_tricks.as_strided(flat, shape=ne[::-1], strides=nb[::-1])
        return out.copy() if copy else out

    def _grow(self, span: int):
        if len(self._scratch) < span:
            self._scratch = ctypes.create_string_buffer(span)
        return self._scratch

    def _sum_squares(self, rows: np.ndarray) -> np.ndarray:
        """Column sums of squares; rows split over the threads (numpy releases the GIL)."""
        def part(block):
            return np.square(block).sum(axis=0, dtype=np.float64)

        if self.pool is None or len(rows) < SPLIT_ROWS * self.threads:
            return part(rows)
        bounds = np.linspace(0, len(rows), self.threads + 1).astype(int)
        blocks = [rows[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
        return sum(self.pool.map(part, blocks))


def gguf_tokens(path, text: str) -> np.ndarray:
    """``text`` tokenized by the GGUF file's own vocabulary, BOS first when it asks for one."""
    from ..evaluate.llama_backend import LlamaModel

    with LlamaModel(path, n_ctx=16, vocab_only=True) as vocab:
        return vocab.tokenize(text)


def compute_imatrix_gguf(path, tokens, *, ctx: int = 512, chunks: int | None = None,
                         threads: int | None = None, n_batch: int = 2048, dataset: str = "",
                         progress: bool = True) -> Imatrix:
    """An imatrix of the GGUF file ``path`` from calibration ``tokens``, computed by llama.cpp.

    ``tokens`` as :func:`gguf_tokens` makes them. Chunks, batches and counts as llama-imatrix
    with ``-c ctx -b n_batch`` (the first token of each chunk becomes BOS when the vocabulary
    adds one). Keys are the GGUF's tensor names.

    >>> # im = compute_imatrix_gguf("m-F16.gguf", gguf_tokens("m-F16.gguf", text), ctx=512)
    """
    from tqdm import tqdm

    from ..evaluate.perplexity import open_for_eval

    collector = _Collector()
    try:
        with open_for_eval(path, ctx, threads, n_batch=n_batch, eval_callback=collector.callback) as model:
            collector.use_threads(model.n_threads)
            windows = np.asarray(chunk_tokens(tokens, ctx=ctx, chunks=chunks,
                                              bos_id=model.bos if model.add_bos else None), dtype=np.int32)
            n_seq = max(1, min(model.n_seq_max, model.n_batch // ctx))
            span = ctx if n_seq > 1 else min(model.n_batch, ctx)
            bar = tqdm(total=len(windows), desc="imatrix", unit="chunk", disable=not progress)
            for start in range(0, len(windows), n_seq):
                group = windows[start:start + n_seq]
                model.clear()
                for lo in range(0, ctx, span):
                    positions = np.arange(lo, min(lo + span, ctx))
                    batch_tokens = group[:, positions].reshape(-1)
                    pos = np.tile(positions, len(group))
                    seq = np.repeat(np.arange(len(group), dtype=np.int32), len(positions))
                    # every token an output, as llama-imatrix asks (the last block's FFN then
                    # runs on all of them); the logits themselves are not read
                    model.decode_batch(batch_tokens, pos, seq, np.ones(len(pos), bool), copy=False)
                    if collector.error is not None:
                        raise collector.error
                bar.update(len(group))
            bar.close()
    finally:
        collector.close()
    if not collector.sums:
        raise QuantError("llama.cpp evaluated the file without a single blk.* matrix product to collect",
                         path)
    result = Imatrix(   # experts: one row of sums and one count per expert
        sums={n: s.astype(np.float32).reshape(np.size(collector.counts[n]), -1) for n, s in collector.sums.items()},
        counts={n: np.asarray(c, dtype=np.float32).reshape(-1) for n, c in collector.counts.items()},
        datasets=[dataset] if dataset else [],
        chunk_count=len(windows),
        chunk_size=ctx,
    )
    check_finite(result, path)
    return result
