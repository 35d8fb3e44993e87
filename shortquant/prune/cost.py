"""What ``prune`` costs, and the calibration defaults that keep a big model near a few exports.

Work is counted in block-token runs: one decoder block's forward pass on one token (a backward
pass counts two). With n blocks, k to remove, T_s search tokens, T_h held-apart tokens and a pool
of P blocks, one block-major sweep per measurement (:meth:`~shortquant.families.block_runner.BlockRunner.nll_many`):

==================  ======================================================================
reference           n (T_s + T_h)
taylor              4.5 n T_s        (forward with the graph kept, then backward: measured)
one-shot PPL        n (n - 1) / 2 T_s   (set {b} reruns blocks b+1 .. n-1)
greedy              per step after the first (the first's sets are one-shot PPL's, not rerun),
                    each of the P - i candidates reruns from its first removed block: ~n/2
                    blocks, plus the shared prefix (n)
exchanges           one sweep of k (P - k) sets (~n/2 blocks each): the round that finds no
                    better set (each exchange taken adds another, at most SWAP_ROUNDS)
held-apart checks   ~n/2 T_h for each set measured there: the one-shot sets, the search's
                    final set and (``step_checks``) every step's set
==================  ======================================================================

Sweeps (each reads every streamed block once, ~LOAD_RUNS a block): reference, one-shot PPL,
Taylor, one per greedy step after the first and one per exchange round; the held-apart checks
ride along with the search's next sweep (``BlockRunner.queue``), so they add none (without the
search: one).

A plain export's time is linear in the parameters too, so prune / export depends on depth and
tokens, not on width: ``ratio = (runs / n + sweeps * LOAD_RUNS) / EXPORT_RUNS`` with the two
constants measured on a LLaMA-7B-shaped checkpoint (README "prune cost"). One-shot PPL grows as
n^2 and greedy as n^2 x pool, so on a big model whose defaults would cost more than TARGET_RATIO
exports :func:`choose` cuts, in this order, what the user did not set: Taylor+ (a table column
only), the held-apart checks of the intermediate steps, the greedy pool (K + K/4, at least K + 2),
the calibration to one searched chunk and one held apart, then the searched chunk's length (the
held-apart chunk keeps --ctx: the final candidates are compared on the full chunk). Small models
(whose whole run takes minutes) keep the full defaults.
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
CTX = 256            # the default chunk length
CTX_STEP = 16        # a cut searched chunk is a multiple of this (and at least MIN_SEARCH_CTX)
MIN_SEARCH_CTX = 32


@dataclass(frozen=True)
class Settings:
    search_chunks: int     # calibration chunks searched on
    search_ctx: int        # their length
    held: int              # chunks held apart
    held_ctx: int          # their length
    pool: int | None       # greedy's pool (None: search.default_pool)
    taylor: bool           # Taylor+ scored (a backward sweep)
    step_checks: bool      # every search step's set measured on the held-apart chunks
    ratio: float           # predicted prune time / plain export time
    cuts: tuple[str, ...] = ()   # what the budget cut from the defaults (empty: nothing)

    @property
    def reduced(self) -> bool:
        return bool(self.cuts)

    @property
    def tokens(self) -> tuple[int, int]:
        return self.search_chunks * self.search_ctx, self.held * self.held_ctx


def greedy_pool_size(n: int, k: int) -> int:
    """The greedy pool on a big deep model: k and a quarter as many again (at least 2 spare), so
    the search can still leave the one-shot set."""
    return min(n, k + max(2, k // 4))


def block_runs(n: int, k: int, t_search: int, t_held: int, pool: int | None, greedy: bool = True,
               taylor: bool = True, step_checks: bool = True) -> dict[str, float]:
    """Block-token runs of each stage (see the module's table)."""
    runs = {"reference": n * (t_search + t_held), "ppl": n * (n - 1) / 2 * t_search}
    if taylor:
        runs["taylor"] = TAYLOR_RUNS * n * t_search
    held_sets = 2 + taylor           # the one-shot sets (bi, ppl, taylor)
    if greedy:
        p = default_pool(n, k) if pool is None else min(pool, n)
        runs["greedy"] = sum(((p - i) * n / 2 + n) * t_search for i in range(1, k))
        runs["exchanges"] = k * (p - k) * n / 2 * t_search
        held_sets += k if step_checks else 1
    runs["held-apart checks"] = held_sets * n / 2 * t_held
    return runs


def sweeps(k: int, greedy: bool = True, taylor: bool = True) -> int:
    """Block sweeps: reference, one-shot, Taylor, then per greedy step after the first and the
    exchange round that ends the search (the held-apart checks ride along), or one for the
    held-apart checks when there is no search."""
    return 2 + taylor + (k if greedy else 1)


def predicted_ratio(n: int, k: int, t_search: int, t_held: int, pool: int | None, streamed: bool,
                    greedy: bool = True, taylor: bool = True, step_checks: bool = True) -> float:
    work = sum(block_runs(n, k, t_search, t_held, pool, greedy, taylor, step_checks).values()) / n
    return (work + (sweeps(k, greedy, taylor) * LOAD_RUNS if streamed else 0)) / EXPORT_RUNS


def choose(n: int, k: int, ctx: int | None, chunks: int | None, held: int | None, pool: int | None,
           params: float, streamed: bool, greedy: bool = True, taylor: bool | None = None,
           available_tokens: int | None = None) -> Settings:
    """The calibration (chunks and their lengths), greedy pool and extra measurements for this
    model. ``ctx``, ``chunks``, ``held``, ``pool``, ``taylor``: what the user gave (None: not
    given). The defaults (16 chunks of 256, a quarter held apart, ``default_pool``, Taylor+ and
    every step's held-apart check) stay unless the model is big (``params``) and they would cost
    more than TARGET_RATIO exports; then the module docstring's cuts apply, one after the other,
    each only as far as needed. ``available_tokens``: the calibration text's length (chunks are
    never more than it holds)."""
    length = ctx or CTX
    most = max(2, (available_tokens or 16 * length) // length)
    chunks_default = min(chunks or 16, most)

    def held_of(c):
        return held if held is not None else max(1, c // HELD_SHARE)

    def settings(c, p, t, checks, s_ctx, cuts):
        h = held_of(c)
        ratio = predicted_ratio(n, k, (c - h) * s_ctx, h * length, p, streamed, greedy, t, checks)
        return Settings(c - h, s_ctx, h, length, p, t, checks, ratio, tuple(cuts))

    full = settings(chunks_default, pool, taylor is not False, True, length, [])
    if params < SMALL_PARAMS or full.ratio <= TARGET_RATIO:
        return full
    cuts: list[str] = []
    state = dict(c=chunks_default, p=pool, t=taylor is not False, checks=True, s_ctx=length)

    def now():
        return settings(state["c"], state["p"], state["t"], state["checks"], state["s_ctx"], cuts)

    steps = []
    if taylor is None:
        steps.append(("taylor", dict(t=False)))
    if greedy:
        steps.append(("step checks", dict(checks=False)))
        if pool is None:
            steps.append(("pool", dict(p=greedy_pool_size(n, k))))
    for what, change in steps:
        if now().ratio <= TARGET_RATIO:
            return now()
        state.update(change)
        cuts.append(what)
    if chunks is None:
        floor = (held or 1) + 1
        while state["c"] > floor and now().ratio > TARGET_RATIO:
            state["c"] -= 1
            if "chunks" not in cuts:
                cuts.append("chunks")
    if ctx is None:
        while state["s_ctx"] - CTX_STEP >= MIN_SEARCH_CTX and now().ratio > TARGET_RATIO:
            state["s_ctx"] = (state["s_ctx"] - 1) // CTX_STEP * CTX_STEP
            if "search ctx" not in cuts:
                cuts.append("search ctx")
    return now()
