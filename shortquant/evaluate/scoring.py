"""Scoring rows of logits where llama.cpp left them: NLL, compact base log-probs, KLD.

llama-perplexity scores each row in place, in float with double sums, over all cores. We do
the same with numpy: rows are read from a view of llama.cpp's output buffer (no copy), in
small blocks so the temporaries stay in cache and no full-vocabulary array is ever held
twice, and the rows of a chunk are split over a pool of threads (numpy releases the GIL in
its loops, so both cores work while llama.cpp is idle between batches).

Per row, with ``m`` the largest logit and ``Z = sum(exp(x - m))`` (float32 exps, float64 sum,
as llama.cpp): ``log_z = m + log(Z)``, the NLL of token ``t`` is ``log_z - x[t]``.

Example::

    scorer = RowScorer(threads=2)
    nll = scorer.nll(rows, targets)                    # float64, one per row
    q, top, nll, argmax = scorer.base_logprobs(rows, targets)
    kld, delta_p, same, nll = scorer.kld(rows, targets, q, top, nll_base, argmax_base)
    scorer.close()
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

# The compact base form (see kld.py): q in 1..65535 spans [top - WINDOW, top]; 0 = below.
WINDOW = 20.0
LEVELS = 65534
STEP = WINDOW / LEVELS
BLOCK_VALUES = 1 << 17  # values per block of rows: about 512 KB of float32, cache-sized


class _Scratch:
    """Per-thread float32 work arrays of one block of rows."""

    def __init__(self, rows: int, n_vocab: int):
        self.t = np.empty((rows, n_vocab), dtype=np.float32)
        self.u = np.empty((rows, n_vocab), dtype=np.float32)
        self.mask = np.empty((rows, n_vocab), dtype=bool)

    def view(self, rows: int):
        return self.t[:rows], self.u[:rows], self.mask[:rows]


def _log_z(x: np.ndarray, t: np.ndarray, u: np.ndarray):
    """(argmax, log_z float64, log(Z) float64) per row of ``x``; leaves ``x - max`` in ``t``."""
    top = np.argmax(x, axis=1)
    m = x[np.arange(len(x)), top]
    np.subtract(x, m[:, None], out=t)
    np.exp(t, out=u)
    log_sum = np.log(u.sum(axis=1, dtype=np.float64))
    return top, m.astype(np.float64) + log_sum, log_sum


def _nll_block(x, targets, scratch):
    """NLL rounded as llama-perplexity rounds it: float ``x[t] - max``, then double ``- log(Z)``
    (so the last digits of a large PPL agree too)."""
    t, u, _ = scratch.view(len(x))
    _, _, log_sum = _log_z(x, t, u)
    rows = np.arange(len(x))
    return log_sum - t[rows, targets].astype(np.float64)


def _base_block(x, targets, scratch):
    """q (uint16), top (float32), nll (float64), argmax (int32) of a block of rows."""
    t, u, mask = scratch.view(len(x))
    top_index, log_z, log_sum = _log_z(x, t, u)
    rows = np.arange(len(x))
    nll = log_sum - t[rows, targets].astype(np.float64)  # rounded as in _nll_block / _kld_block
    m = x[rows, top_index]
    # lp - top = x - m (in t, exact near the top), so q = round((x - m) / STEP) + LEVELS + 1
    np.less(t, np.float32(-WINDOW), out=mask)  # below the window
    np.multiply(t, np.float32(1 / STEP), out=u)
    np.rint(u, out=u)
    np.add(u, np.float32(LEVELS + 1), out=u)
    np.maximum(u, 0, out=u)
    np.copyto(u, 0, where=mask)
    q = u.astype(np.uint16)
    top = (m - log_z).astype(np.float32)
    return q, top, nll, top_index.astype(np.int32)


def _kld_block(x, targets, q, top, nll_base, argmax_base, scratch):
    """kld, delta_p, same top-1 and nll of a block of rows against their base rows.

    With v = (q - LEVELS - 1) * STEP = lp_b - top_b (exact near the top, where it matters)
    and the row's own lp = (x - m) + top_x:  KL = exp(top_b) * sum over kept tokens of
    exp(v) * (v - (x - m) + top_b - top_x).
    """
    t, u, mask = scratch.view(len(x))
    top_index, log_z, log_sum = _log_z(x, t, u)
    rows = np.arange(len(x))
    nll = log_sum - t[rows, targets].astype(np.float64)
    top_b = np.asarray(top, np.float64)
    top_x = x[rows, top_index].astype(np.float64) - log_z
    np.add(q, np.float32(-(LEVELS + 1)), out=u, dtype=np.float32)
    np.multiply(u, np.float32(STEP), out=u)  # v
    np.subtract(u, t, out=t)
    np.add(t, (top_b - top_x).astype(np.float32)[:, None], out=t)  # lp_b - lp
    np.exp(u, out=u)
    np.equal(q, 0, out=mask)
    np.copyto(u, 0, where=mask)
    np.multiply(u, t, out=t)
    kld = np.exp(top_b) * t.sum(axis=1, dtype=np.float64)
    delta_p = np.exp(-nll) - np.exp(-np.asarray(nll_base, np.float64))
    same = top_index == np.asarray(argmax_base)
    return kld, delta_p, same, nll


class RowScorer:
    """Scores rows of logits in blocks, split over ``threads`` threads."""

    def __init__(self, threads: int | None = 1):
        self.threads = max(1, int(threads or 1))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="score") if self.threads > 1 else None
        self._scratch: dict[tuple[int, int], _Scratch] = {}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> "RowScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, rows: np.ndarray, work, arrays: tuple) -> list[tuple]:
        """Apply ``work(x, *row_slices, scratch)`` to blocks of rows; results in row order."""
        rows = np.asarray(rows)
        n_rows, n_vocab = rows.shape
        block = max(1, BLOCK_VALUES // max(1, n_vocab))
        n_parts = min(self.threads, max(1, -(-n_rows // block)))
        bounds = np.linspace(0, n_rows, n_parts + 1).astype(int)

        def part(index: int) -> list[tuple]:
            key = (index, n_vocab)
            if key not in self._scratch:
                self._scratch[key] = _Scratch(block, n_vocab)
            scratch = self._scratch[key]
            out = []
            for lo in range(bounds[index], bounds[index + 1], block):
                hi = min(lo + block, bounds[index + 1])
                x = np.asarray(rows[lo:hi], dtype=np.float32)
                out.append(work(x, *(a[lo:hi] for a in arrays), scratch))
            return out

        if self._pool is None or n_parts == 1:
            parts = [part(i) for i in range(n_parts)]
        else:
            parts = list(self._pool.map(part, range(n_parts)))
        return [r for p in parts for r in p]

    @staticmethod
    def _join(results: list[tuple], n: int) -> tuple:
        return tuple(np.concatenate([r[i] for r in results]) for i in range(n))

    def nll(self, rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Negative log-likelihood of ``targets[i]`` under row ``i`` (float64)."""
        results = self._run(rows, lambda x, t, s: (_nll_block(x, t, s),), (np.asarray(targets),))
        return self._join(results, 1)[0]

    def base_logprobs(self, rows: np.ndarray, targets: np.ndarray):
        """(q uint16, top float32, nll float64, argmax int32): a base's compact log-probs."""
        return self._join(self._run(rows, _base_block, (np.asarray(targets),)), 4)

    def kld(self, rows: np.ndarray, targets: np.ndarray, q, top, nll_base, argmax_base):
        """(kld, delta_p, same_top1, nll) per row against a base's compact log-probs."""
        arrays = (np.asarray(targets), q, np.asarray(top), np.asarray(nll_base), np.asarray(argmax_base))
        return self._join(self._run(rows, _kld_block, arrays), 4)
