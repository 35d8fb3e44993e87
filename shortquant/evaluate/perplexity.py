"""Perplexity the way llama.cpp's ``llama-perplexity`` measures it.

The rules (tools/perplexity in llama.cpp):

* the whole text is tokenized once, with BOS when the vocabulary asks for it;
* the tokens are cut into ``len // ctx`` chunks of ``ctx`` tokens (the tail is dropped),
  and at least two chunks are needed;
* each chunk is evaluated from an empty KV cache with its first token replaced by BOS;
* only the second half is scored: the logits at positions ``ctx//2 .. ctx-2`` predict the
  (original) tokens at ``ctx//2+1 .. ctx-1``;
* PPL = exp(mean NLL); the error is the standard error of the mean NLL times PPL
  (the "Final estimate: PPL = x +/- y" line).

Example::

    text = read_text(DEFAULT_TEXT)
    with open_for_eval("m.gguf", 512) as model:
        chunks = split_chunks(model.tokenize(text), 512)
        stats = NllStats()
        for chunk, logits in chunk_logits(model, chunks):
            stats.add(token_nll(logits[:-1], chunk[512 // 2 + 1:]))
        print(stats.ppl, stats.err)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shortquant.errors import EvalError

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "eval_text.txt"
DEFAULT_BATCH = 2048  # llama-perplexity's default -b
DEFAULT_UBATCH = 512  # and -ub


def read_text(path: str | Path) -> str:
    """The evaluation text, minus one trailing newline (as ``llama-perplexity -f`` reads it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError("text file not found", path)
    except UnicodeDecodeError as exc:
        raise EvalError(f"text is not UTF-8 ({exc.reason} at byte {exc.start})", path)
    except OSError as exc:
        raise EvalError(f"cannot read text: {exc.strerror}", path)
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise EvalError("text file is empty", path)
    return text


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def first_scored(ctx: int) -> int:
    """Position of the first logit row that is scored in a chunk (the second half)."""
    return ctx // 2


def split_chunks(tokens: np.ndarray, ctx: int, n_chunks: int | None = None,
                 source: str | Path | None = None) -> np.ndarray:
    """Cut ``tokens`` into ``(n, ctx)`` chunks like llama-perplexity; refuse too short texts.

    Example::

        split_chunks(np.arange(1000), 128).shape   # (7, 128)
    """
    if ctx < 4:
        raise EvalError(f"--ctx {ctx} is too small (at least 4)")
    if len(tokens) < 2 * ctx:
        raise EvalError(
            f"text tokenizes to {len(tokens)} tokens; --ctx {ctx} needs at least {2 * ctx} "
            f"(two chunks), so give a longer text or a smaller --ctx", source)
    n_max = len(tokens) // ctx
    n = n_max if not n_chunks or n_chunks < 0 else min(n_chunks, n_max)
    return np.asarray(tokens[: n * ctx], dtype=np.int32).reshape(n, ctx)


def model_inputs(chunk: np.ndarray, add_bos: bool, bos: int) -> np.ndarray:
    """The chunk as fed to the model: first token replaced by BOS when the vocab adds one."""
    inputs = np.array(chunk, dtype=np.int32, copy=True)
    if add_bos:
        inputs[0] = bos
    return inputs


def open_for_eval(path, ctx: int, threads: int | None = None, n_batch: int = DEFAULT_BATCH,
                  n_ubatch: int = DEFAULT_UBATCH, n_gpu_layers: int = 0, eval_callback=None):
    """A :class:`LlamaModel` laid out like llama-perplexity's context for ``--ctx ctx``.

    llama-perplexity evaluates ``max(1, n_batch // ctx)`` chunks at once, each in its own
    sequence (KV stream), with micro-batches of ``n_ubatch`` tokens. The layout changes the
    floating-point path slightly, so we use the same one to land on the same digits.
    """
    from shortquant.evaluate.llama_backend import LlamaModel

    n_seq = max(1, n_batch // ctx)
    total = n_seq * ctx
    return LlamaModel(path, n_ctx=total, n_batch=min(n_batch, total),
                      n_ubatch=min(n_ubatch, n_batch, total), n_seq_max=n_seq, n_threads=threads,
                      n_gpu_layers=n_gpu_layers, eval_callback=eval_callback)


def chunk_logits(model, chunks: np.ndarray, progress=None):
    """Yield ``(chunk, logits)`` per chunk; logits are the rows ``ctx//2 .. ctx-1`` (float32).

    Chunks are decoded ``model.n_seq_max`` at a time from an empty cache, one sequence each,
    logits requested only for the scored half (plus the last row, which llama-perplexity
    also requests and ignores). A chunk longer than a batch is decoded in several calls.

    The logits are a view of llama.cpp's output buffer (as llama-perplexity reads them, no
    copy): use them before asking for the next chunk, and copy what must outlive that.
    """
    ctx = chunks.shape[1]
    first = first_scored(ctx)
    n_seq = max(1, min(model.n_seq_max, model.n_batch // ctx))
    span = ctx if n_seq > 1 else min(model.n_batch, ctx)
    for start in range(0, len(chunks), n_seq):
        group = chunks[start:start + n_seq]
        inputs = [model_inputs(chunk, model.add_bos, model.bos) for chunk in group]
        model.clear()
        parts = []
        for lo in range(0, ctx, span):
            positions = np.arange(lo, min(lo + span, ctx))
            tokens = np.concatenate([row[positions] for row in inputs])
            pos = np.tile(positions, len(group))
            seq = np.repeat(np.arange(len(group), dtype=np.int32), len(positions))
            # one decode: a view; several (a chunk longer than a batch): copies joined
            logits = model.decode_batch(tokens, pos, seq, pos >= first, copy=span < ctx)
            if logits is not None:
                parts.append(logits.reshape(len(group), -1, logits.shape[-1]))
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        for chunk, rows in zip(group, logits):
            yield chunk, rows
            if progress is not None:
                progress.update(1)


def token_nll(logits: np.ndarray, targets: np.ndarray, scorer=None) -> np.ndarray:
    """Negative log-likelihood of ``targets[i]`` under row ``i`` of ``logits`` (float64).

    ``scorer``: a :class:`~shortquant.evaluate.scoring.RowScorer` to spread the rows over
    its threads (one thread without).
    """
    from shortquant.evaluate.scoring import RowScorer

    return (scorer or RowScorer(1)).nll(logits, np.asarray(targets))


def scored_targets(chunk: np.ndarray) -> np.ndarray:
    """The tokens a chunk's scored rows predict: positions ctx//2+1 .. ctx-1."""
    return chunk[first_scored(len(chunk)) + 1:]


@dataclass
class NllStats:
    """Running sums of NLL, giving llama-perplexity's PPL and its error."""

    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0

    def add(self, nll: np.ndarray) -> None:
        nll = np.asarray(nll, dtype=np.float64)
        self.total += float(nll.sum())
        self.total_sq += float(np.square(nll).sum())
        self.count += int(nll.size)

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def ppl(self) -> float:
        return math.exp(self.mean)

    @property
    def err(self) -> float:
        """Standard error of the mean NLL, scaled by PPL (d exp(x) = exp(x) dx)."""
        variance = self.total_sq / self.count - self.mean ** 2
        if variance <= 0 or self.count < 2:
            return 0.0
        return math.sqrt(variance / (self.count - 1)) * self.ppl


def perplexity(model, text: str, ctx: int, n_chunks: int | None = None, progress=None) -> NllStats:
    """Perplexity of a model opened with :func:`open_for_eval` on ``text`` with context ``ctx``.

    Example::

        with open_for_eval("m.gguf", 128) as m:
            s = perplexity(m, read_text(DEFAULT_TEXT), 128)
            print(f"PPL = {s.ppl:.4f} +/- {s.err:.5f}")
    """
    from shortquant.evaluate.scoring import RowScorer

    chunks = split_chunks(model.tokenize(text), ctx, n_chunks)
    stats = NllStats()
    with RowScorer(model.n_threads) as scorer:
        for chunk, logits in chunk_logits(model, chunks, progress):
            stats.add(token_nll(logits[:-1], scored_targets(chunk), scorer))
    return stats
