"""KL divergence of a file's next-token distributions against a base, like llama-perplexity's
``--kl-divergence`` mode, with the base's log-probabilities computed once and cached.

Base log-probabilities are stored per scored token (the same second-half rows perplexity
scores) in a folder of ``.npy`` files:

* ``q.npy`` (rows x n_vocab, uint16): log-probs within ``WINDOW`` nats of the row's top
  log-prob, on a uniform grid (step WINDOW/65534 ~ 3e-4 nats, so at most 1.5e-4 off);
  0 marks a token more than WINDOW below the top (p < 2e-9 times the top p), left out
  of the KLD sum as llama.cpp leaves out base log-probs below -16;
* ``top.npy`` (rows, float32): the row's top log-prob (the grid's upper end);
* ``nll.npy`` (rows, float64): the base's NLL of the token that followed;
* ``argmax.npy`` (rows, int32): the base's top-1 token;
* ``tokens.npy`` (chunks x ctx, int32): the evaluated tokens, to refuse another tokenizer;
* ``meta.json``: format, ctx, n_vocab, n_chunks, window and the base it came from.

``q.npy`` is the big one (2 bytes per vocabulary entry per scored token): it is written chunk
by chunk as the base is evaluated and read back one chunk at a time, never mapped whole, so
memory stays at one chunk's rows however long the text. Half the size of float32 logits,
exact where it matters (NLL, top-1); the mean KLD of a file against its own cache is ~1e-7.

Example::

    store = ensure_base("model-F32.gguf", chunks, n_vocab=32000)
    stats, scorer = KldStats(), RowScorer(threads=2)
    for chunk_index, (chunk, logits) in enumerate(chunk_logits(model, chunks)):
        kld, delta_p, same, nll, nll_base = compare_chunk(logits[:-1], scored_targets(chunk),
                                                          store, chunk_index, scorer)
        stats.add(kld, delta_p, same)
    print(stats.summary())
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from shortquant.errors import EvalError
from shortquant.evaluate.perplexity import first_scored, model_inputs, scored_targets
from shortquant.evaluate.scoring import LEVELS, STEP, WINDOW, RowScorer

FORMAT = "shortquant-base-logprobs/1"
__all__ = ["LEVELS", "STEP", "WINDOW", "BaseStore", "KldStats", "compare_chunk", "ensure_base"]
FINGERPRINT_BYTES = 16 << 20


# -- where bases come from ------------------------------------------------------------------
def base_kind(base: str | Path) -> str:
    """'cache' (a folder made by this module), 'hf' (a Hugging Face model folder) or 'gguf'."""
    base = Path(base)
    if base.is_dir():
        if (base / "meta.json").is_file():
            return "cache"
        if (base / "config.json").is_file():
            return "hf"
        raise EvalError("base folder is neither a Hugging Face model (config.json) "
                        "nor a base-logits cache (meta.json)", base)
    if base.is_file():
        return "gguf"
    raise EvalError("base not found", base)


def _file_fingerprint(path: Path, digest) -> None:
    """Size plus the first and last 16 MiB: cheap, and changes whenever the weights do."""
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_BYTES))
        if size > 2 * FINGERPRINT_BYTES:
            handle.seek(size - FINGERPRINT_BYTES)
            digest.update(handle.read())


def base_fingerprint(base: str | Path) -> str:
    """A short hash that identifies a base GGUF file or model folder's content."""
    base = Path(base)
    digest = hashlib.sha256()
    if base.is_dir():
        for path in sorted(p for p in base.iterdir() if p.is_file()):
            if path.suffix in (".json", ".safetensors", ".bin", ".model", ".pt", ".pth"):
                _file_fingerprint(path, digest)
    else:
        _file_fingerprint(base, digest)
    return digest.hexdigest()[:32]


def default_cache_dir() -> Path:
    from ..resources import cache_root

    return cache_root() / "base-logprobs"


def cache_key(fingerprint: str, chunks: np.ndarray, n_batch: int = 2048) -> str:
    """Key of a base run: the base's content, the exact tokens (text + tokenizer), ctx, batch."""
    digest = hashlib.sha256()
    digest.update(fingerprint.encode())
    digest.update(np.ascontiguousarray(chunks, dtype=np.int32).tobytes())
    digest.update(f"ctx={chunks.shape[1]} batch={n_batch}".encode())
    return digest.hexdigest()[:24]


# -- the compact form ------------------------------------------------------------------------
def quantize_logprobs(lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q uint16, top float32) for rows of float64 log-probs."""
    top = lp.max(axis=1)
    offset = lp - (top - WINDOW)[:, None]
    q = np.where(offset >= 0, np.rint(np.clip(offset, 0, WINDOW) / STEP) + 1, 0)
    return q.astype(np.uint16), top.astype(np.float32)


def dequantize_logprobs(q: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log-probs float64, kept mask) from the compact form."""
    q = np.asarray(q)
    kept = q > 0
    lp = (np.asarray(top, dtype=np.float64) - WINDOW)[:, None] + (q.astype(np.float64) - 1) * STEP
    return lp, kept


def _npy_data_offset(handle) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, offset of the data) of an open ``.npy`` file."""
    version = np.lib.format.read_magic(handle)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(handle)
    if fortran:
        raise ValueError("Fortran-ordered array")
    return shape, dtype, handle.tell()


class BaseStore:
    """A base's cached log-probs; the rows of chunk ``i`` via :meth:`chunk`, read from disk."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EvalError(f"not a base-logits cache ({exc})", self.folder)
        if self.meta.get("format") != FORMAT:
            raise EvalError(f"base-logits cache of another format ({self.meta.get('format')})", self.folder)
        self.ctx = int(self.meta["ctx"])
        self.n_vocab = int(self.meta["n_vocab"])
        self.rows_per_chunk = self.ctx - first_scored(self.ctx) - 1
        try:
            load = lambda name: np.load(self.folder / f"{name}.npy")  # noqa: E731
            self.tokens = load("tokens")
            self.top, self.nll, self.argmax = load("top"), load("nll"), load("argmax")
            self._q_file = open(self.folder / "q.npy", "rb")
            shape, dtype, self._q_offset = _npy_data_offset(self._q_file)
        except (OSError, ValueError) as exc:
            raise EvalError(f"damaged base-logits cache ({exc}); delete the folder to recompute it",
                            self.folder)
        n_rows = len(self.top)
        size = os.fstat(self._q_file.fileno()).st_size
        if (tuple(shape) != (n_rows, self.n_vocab) or dtype != np.uint16
                or size < self._q_offset + n_rows * self.n_vocab * 2):
            self.close()
            raise EvalError("damaged base-logits cache (q.npy does not hold every row); delete the "
                            "folder to recompute it", self.folder)
        # two buffers: chunk i is handed out while chunk i+1 is read ahead in a thread (that
        # read often lands during llama.cpp's next decode)
        self._buffers = [np.empty((self.rows_per_chunk, self.n_vocab), dtype=np.uint16) for _ in range(2)]
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="base-read")
        self._ahead: tuple[int, Future] | None = None

    def _read(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self.top) // self.rows_per_chunk:
            raise EvalError(f"base-logits cache has no chunk {index}", self.folder)
        buffer = self._buffers[index % 2]
        offset = self._q_offset + index * self.rows_per_chunk * self.n_vocab * 2
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):  # os.preadv may return short; read until the rows are in
            n = os.preadv(self._q_file.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise EvalError(f"base-logits cache ends inside chunk {index}", self.folder)
            done += n
        return buffer

    def chunk(self, index: int):
        """(q, top, nll, argmax) of chunk ``index``; q is valid until the next call."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == index:
            q = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].result()  # never two reads into one buffer
            q = self._read(index)
        if (index + 1) * self.rows_per_chunk < len(self.top):
            self._ahead = (index + 1, self._reader.submit(self._read, index + 1))
        rows = slice(index * self.rows_per_chunk, (index + 1) * self.rows_per_chunk)
        return q, self.top[rows], self.nll[rows], self.argmax[rows]

    def close(self) -> None:
        if getattr(self, "_reader", None) is not None:
            self._reader.shutdown(wait=True)
            self._reader = None
        if getattr(self, "_q_file", None) is not None:
            self._q_file.close()
            self._q_file = None

    def __del__(self):
        self.close()

    def check_compatible(self, chunks: np.ndarray, n_vocab: int, what: str | Path) -> None:
        """Refuse a file whose vocabulary or tokenization differs from the base's."""
        if n_vocab != self.n_vocab:
            raise EvalError(f"base has another vocabulary ({self.n_vocab} tokens, this file "
                            f"{n_vocab}); compare files of the same model", what)
        if chunks.shape[1] != self.ctx:
            raise EvalError(f"base logits were computed with ctx {self.ctx}, not {chunks.shape[1]}", what)
        if len(chunks) > len(self.tokens) or not np.array_equal(self.tokens[: len(chunks)], chunks):
            raise EvalError("this file tokenizes the text differently from the base "
                            "(another tokenizer or vocabulary)", what)


class _StoreWriter:
    """Writes a base store chunk by chunk (in order) into a temporary folder, renamed when complete.

    q rows go to ``q.npy`` as each chunk is scored, written by a thread while the next chunk is
    evaluated (one chunk in flight at most); the small per-row arrays are kept in memory and
    saved at the end.
    """

    def __init__(self, folder: Path, chunks: np.ndarray, n_vocab: int, meta: dict):
        self.folder = folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".part", dir=folder.parent))
        ctx = chunks.shape[1]
        self.rows = ctx - first_scored(ctx) - 1
        n_rows = len(chunks) * self.rows
        self.q_file = open(self.tmp / "q.npy", "wb")
        np.lib.format.write_array_header_1_0(
            self.q_file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint16)),
                          "fortran_order": False, "shape": (n_rows, int(n_vocab))})
        self.top = np.zeros(n_rows, dtype=np.float32)
        self.nll = np.zeros(n_rows, dtype=np.float64)
        self.argmax = np.zeros(n_rows, dtype=np.int32)
        self.next_index = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="base-write")
        self._pending: Future | None = None
        np.save(self.tmp / "tokens.npy", np.ascontiguousarray(chunks, dtype=np.int32))
        self.meta = dict(meta, format=FORMAT, ctx=int(ctx), n_vocab=int(n_vocab),
                         n_chunks=int(len(chunks)), window=WINDOW)

    def put(self, index: int, scored_logits: np.ndarray, targets: np.ndarray,
            scorer: RowScorer | None = None) -> None:
        if index != self.next_index:
            raise ValueError(f"chunk {index} written out of order (expected {self.next_index})")
        rows = slice(index * self.rows, (index + 1) * self.rows)
        scorer = scorer or RowScorer(1)
        q, self.top[rows], self.nll[rows], self.argmax[rows] = scorer.base_logprobs(scored_logits, targets)
        self._wait()
        self._pending = self._writer.submit(self.q_file.write, np.ascontiguousarray(q).data)
        self.next_index += 1

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # a write error surfaces here

    def _close(self) -> None:
        try:
            self._wait()
        finally:
            self._writer.shutdown(wait=True)
            self.q_file.close()

    def finish(self) -> Path:
        self._close()
        for name in ("top", "nll", "argmax"):
            np.save(self.tmp / f"{name}.npy", getattr(self, name))
        (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=2))
        if self.folder.exists():  # another run finished the same key first
            shutil.rmtree(self.tmp)
        else:
            os.replace(self.tmp, self.folder)
        return self.folder

    def abort(self) -> None:
        try:
            self._close()
        except OSError:
            pass  # the run is failing already; its own error is the one to report
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- computing a base --------------------------------------------------------------------------
def hf_logits(model_dir: str | Path, chunks):
    """Yield float32 logits ``(ctx, n_vocab)`` of a Hugging Face causal LM for each input chunk.

    ``chunks`` are the token ids as fed to the model (first token already BOS). Runs on CPU
    in float32, one chunk per forward pass.

    Example::

        for logits in hf_logits("path/to/hf-model", [[1, 403, 407, 261]]):
            print(logits.shape)
    """
    from ..families.hf_model import load_torch_model

    model = load_torch_model(Path(model_dir))   # the blocks export finds, loaded strictly (errors now)
    return _forward_chunks(model, chunks)


def _forward_chunks(model, chunks):
    import torch

    with torch.inference_mode():
        for chunk in chunks:
            ids = torch.as_tensor(np.asarray(chunk, dtype=np.int64))[None, :]
            yield model(input_ids=ids).logits[0].float().numpy()


def _hf_vocab_size(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    config = config.get("text_config", config)
    return config.get("vocab_size")


def ensure_base(base: str | Path, chunks: np.ndarray, n_vocab: int, add_bos: bool = True,
                bos: int = 1, *, cache_dir: str | Path | None = None, threads: int | None = None,
                n_batch: int = 2048, gpu_layers: int = 0, progress_factory=None) -> BaseStore:
    """The cached base log-probs for these chunks, computing them first when missing.

    ``base`` is a GGUF file, a Hugging Face model folder or a cache folder made earlier.
    ``chunks`` are the original token chunks (as split by :func:`split_chunks`); ``add_bos``
    and ``bos`` say how the evaluated file prepares them (used for a Hugging Face base,
    which has no llama.cpp vocabulary of its own).

    Example::

        store = ensure_base("m-F32.gguf", chunks, n_vocab=512)
    """
    base = Path(base)
    kind = base_kind(base)
    if kind == "cache":
        store = BaseStore(base)
        store.check_compatible(chunks, n_vocab, base)
        return store

    folder = Path(cache_dir or default_cache_dir()) / cache_key(base_fingerprint(base), chunks, n_batch)
    if (folder / "meta.json").is_file():
        store = BaseStore(folder)
        store.check_compatible(chunks, n_vocab, base)
        return store

    ctx = chunks.shape[1]
    meta = {"base": str(base.resolve()), "kind": kind}
    if kind == "hf":
        hf_vocab = _hf_vocab_size(base)
        if hf_vocab is not None and hf_vocab != n_vocab:
            raise EvalError(f"base has another vocabulary ({hf_vocab} tokens, the evaluated files "
                            f"{n_vocab}); compare files of the same model", base)
        inputs = [model_inputs(c, add_bos, bos) for c in chunks]
        first = first_scored(ctx)
        stream = (logits[first:] for logits in hf_logits(base, inputs))
        with RowScorer(threads or os.cpu_count()) as scorer:
            return _write_store(folder, chunks, n_vocab, meta, stream, progress_factory, base, scorer)

    from shortquant.evaluate.perplexity import chunk_logits, open_for_eval

    with open_for_eval(base, ctx, threads, n_batch=n_batch, n_gpu_layers=gpu_layers) as model:
        if model.n_vocab != n_vocab:
            raise EvalError(f"base has another vocabulary ({model.n_vocab} tokens, the evaluated "
                            f"files {n_vocab}); compare files of the same model", base)
        stream = (logits for _, logits in chunk_logits(model, chunks))
        with RowScorer(model.n_threads) as scorer:
            return _write_store(folder, chunks, n_vocab, meta, stream, progress_factory, base, scorer)


def _write_store(folder, chunks, n_vocab, meta, stream, progress_factory, base, scorer) -> BaseStore:
    try:
        writer = _StoreWriter(folder, chunks, n_vocab, meta)
    except OSError as exc:
        raise EvalError(f"cannot write the base-logits cache: {exc.strerror or exc}", folder) from exc
    bar = progress_factory(len(chunks), f"base {Path(base).name}") if progress_factory else None
    try:
        for index, (chunk, logits) in enumerate(zip(chunks, stream)):
            if logits.shape[-1] != n_vocab:
                raise EvalError(f"base has another vocabulary ({logits.shape[-1]} logits per "
                                f"token, the evaluated files {n_vocab})", base)
            # logits may be a view of llama.cpp's buffer: scored before the next decode
            writer.put(index, logits[:-1], scored_targets(chunk), scorer)
            if bar is not None:
                bar.update(1)
        return BaseStore(writer.finish())
    except OSError as exc:  # disk full, cache folder not writable, ...
        writer.abort()
        raise EvalError(f"cannot write the base-logits cache: {exc.strerror or exc}", folder) from exc
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()


# -- comparing -----------------------------------------------------------------------------------
def compare_chunk(scored_logits: np.ndarray, targets: np.ndarray, store: BaseStore, index: int,
                  scorer: RowScorer | None = None):
    """Per-token (kld, delta_p, same_top1, nll, nll_base) of one chunk against the base."""
    q, top, nll_base, argmax_base = store.chunk(index)
    kld, delta_p, same, nll = (scorer or RowScorer(1)).kld(scored_logits, targets, q, top, nll_base,
                                                           argmax_base)
    return kld, delta_p, same, nll, np.asarray(nll_base)


class KldStats:
    """Collects per-token values and summarises them as llama-perplexity's KLD report does."""

    PERCENTILES = {"p99_9": 99.9, "p99": 99.0, "p95": 95.0, "p90": 90.0,
                   "p10": 10.0, "p5": 5.0, "p1": 1.0}

    def __init__(self):
        self.kld, self.delta_p, self.same = [], [], []

    def add(self, kld, delta_p, same) -> None:
        self.kld.append(np.asarray(kld, dtype=np.float64))
        self.delta_p.append(np.asarray(delta_p, dtype=np.float64))
        self.same.append(np.asarray(same, dtype=bool))

    @staticmethod
    def _mean_err(values: np.ndarray) -> tuple[float, float]:
        # llama.cpp: sqrt((E[x^2] - E[x]^2) / (n - 1)), 0 for ten values or fewer
        n = values.size
        mean = float(values.mean())
        var = float(np.square(values).mean()) - mean * mean
        return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0

    def summary(self) -> dict:
        """{"mean","err","p99_9",...,"median",...,"p1","dp_mean","dp_rms","same_top1"}."""
        kld = np.concatenate(self.kld)
        delta_p = np.concatenate(self.delta_p)
        same = np.concatenate(self.same)
        mean, err = self._mean_err(kld)
        out = {"mean": mean, "err": err}
        for name, pct in self.PERCENTILES.items():
            out[name] = float(np.percentile(kld, pct))
            if name == "p90":
                out["median"] = float(np.median(kld))
        out["dp_mean"] = float(delta_p.mean())
        out["dp_rms"] = float(math.sqrt(np.square(delta_p).mean()))
        out["same_top1"] = float(same.mean())
        return out
