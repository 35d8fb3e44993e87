"""What ``prune`` costs, and the calibration defaults that keep a big model near a few exports.

Work is counted in block-token runs: one decoder block's forward pass on one token (a backward
pass counts two). With n blocks, k to remove, T_s search tokens and T_h held-apart tokens, one
sweep per measurement (:meth:`~shortquant.prune.runner.BlockRunner.nll_many`):

=============  ===========================================================================
reference      n (T_s + T_h)
taylor         4.5 n T_s                (forward with the graph kept, then backward: measured)
one-shot PPL   n (n - 1) / 2 T_s        (set {b} reruns blocks b+1 .. n-1)
greedy         per step after the first (the first's sets are one-shot PPL's, not rerun),
               each candidate reruns from its first removed block: ~n/2 blocks for a block
               anywhere, plus the shared prefix (n); and per step the chosen set on T_h
exchanges      one sweep of k (pool - k) sets (~n/2 blocks each) and a held-apart check: the
               round that finds no better set; each exchange taken adds another (at most
               SWAP_ROUNDS), so a search that keeps improving costs up to SWAP_ROUNDS times this
final pick     the 3 one-shot sets on T_h (~n/2 each)
=============  ===========================================================================

A plain export's time is linear in the parameters too, so prune / export depends on depth and
tokens, not on width: ``ratio = (runs / n + sweeps * LOAD_RUNS) / EXPORT_RUNS`` with the two
constants measured on a LLaMA-7B-shaped checkpoint (README "prune cost"). One-shot PPL grows
as n^2 and greedy as n^2 x pool, so on deep models the defaults shrink the candidate tokens and
the greedy pool; small models (whose whole run takes minutes) keep the full defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from .search import default_pool

# One block's q4_k_m export costs as much CPU time as this many block-token runs (float32 torch);
# a streamed block's read costs about LOAD_RUNS per sweep. Measured at LLaMA-7B width, 2 threads:
# export 21.8 s CPU a block, a block-token run 12.5 ms CPU (scripts/bench_prune_cost.py).
EXPORT_RUNS = 1750
LOAD_RUNS = 100
TAYLOR_RUNS = 4.5    # Taylor's forward + backward of a block, in forward runs
TARGET_RATIO = 3.0
SMALL_PARAMS = 1e9   # a model below this many parameters keeps the full defaults (minutes on a CPU)
HELD_SHARE = 4       # a quarter of the chunks held apart by default


@dataclass(frozen=True)
class Settings:
    chunks: int            # calibration chunks in all
    held: int              # of which held apart
    pool: int | None       # greedy's pool (None: search.default_pool)
    ratio: float           # predicted prune time / plain export time
    reduced: bool          # the budget shrank the defaults


def greedy_pool_size(n: int, k: int) -> int:
    """The greedy pool on a deep model: k plus half as many again (at least 2 spare), so the
    search can still leave the one-shot set."""
    return min(n, k + max(2, k // 2))


def block_runs(n: int, k: int, t_search: int, t_held: int, pool: int | None, greedy: bool = True) -> dict[str, float]:
    """Block-token runs of each stage (see the module's table)."""
    runs = {"reference": n * (t_search + t_held), "taylor": TAYLOR_RUNS * n * t_search,
            "ppl": n * (n - 1) / 2 * t_search, "greedy": 0.0, "final": 3 * n / 2 * t_held}
    if greedy:
        p = default_pool(n, k) if pool is None else min(pool, n)
        runs["greedy"] = sum(((p - i) * n / 2 + n) * t_search for i in range(1, k)) + k * n / 2 * t_held
        runs["exchanges"] = k * (p - k) * n / 2 * t_search + n / 2 * t_held
    return runs


def sweeps(k: int, greedy: bool = True) -> int:
    """Block sweeps (each reads every streamed block once): reference, one-shot, taylor, the final
    pick's one-shot sets, per greedy step its candidates (but the first) and its held check, and
    the same two for the exchange round that ends the search."""
    return 3 + 3 + (2 * k + 1 if greedy else 0)


def predicted_ratio(n: int, k: int, t_search: int, t_held: int, pool: int | None, streamed: bool,
                    greedy: bool = True) -> float:
    work = sum(block_runs(n, k, t_search, t_held, pool, greedy).values()) / n
    return (work + (sweeps(k, greedy) * LOAD_RUNS if streamed else 0)) / EXPORT_RUNS


def choose(n: int, k: int, ctx: int, chunks: int, held: int | None, pool: int | None, params: float,
           streamed: bool, greedy: bool = True, chunks_given: bool = False, pool_given: bool = False) -> Settings:
    """The calibration chunks, held-apart chunks and greedy pool for this model: the given ones,
    else the defaults unless the model is big (``params``) and they would cost more than
    TARGET_RATIO exports;
    then the pool shrinks to :func:`greedy_pool_size` and the chunks to what fits (at least one
    to search on and one held apart)."""
    def held_of(c):
        return held if held is not None else max(1, c // HELD_SHARE)

    def ratio(c, p):
        h = held_of(c)
        return predicted_ratio(n, k, (c - h) * ctx, h * ctx, p, streamed, greedy)

    if params < SMALL_PARAMS or ratio(chunks, pool) <= TARGET_RATIO:
        return Settings(chunks, held_of(chunks), pool, ratio(chunks, pool), False)
    if not pool_given and greedy:
        pool = greedy_pool_size(n, k)
    if not chunks_given:
        floor = (held or 1) + 1
        while chunks > floor and ratio(chunks, pool) > TARGET_RATIO:
            chunks -= 1
    return Settings(chunks, held_of(chunks), pool, ratio(chunks, pool), True)
