"""Choosing the set of blocks to remove.

One-shot: a criterion's ``k`` cheapest blocks together (Taylor+ keeps the first four and the last
two blocks out of the candidates, as Shortened LLaMA does, when enough others remain). One-shot
scores ignore how removals interact: two blocks that each matter little can matter together.

The default search has two stages, both on the calibration PPL of the search chunks:

1. ``greedy``: remove one block at a time; every pool block not yet removed is tried on top of
   those already removed, and the one whose removal gives the lowest PPL goes.
2. ``swaps``: greedy never takes back an early choice that later ones made a poor fit, so then
   every exchange of a removed block for a kept pool block is tried, the best one is taken if it
   lowers the PPL, and so on until none does (at most ``SWAP_ROUNDS`` exchanges).

The pool is the blocks one-shot PPL ranks cheapest (``default_pool``: 2K, at least K + 4; ``prune``
passes K + K/4 on a big deep model, see ``cost.py``), which keeps the cost bounded on deep models. Then the swapped set, the greedy set and every one-shot set
are measured on the held-apart chunks (calibration text the choosing never saw) and the lowest
wins, so the default is never worse there than a one-shot choice. The held-apart checks (each
step's set, or only the final candidates' with ``step_checks=False``) are queued on the runner
and measured along with the search's next sweep, not in sweeps of their own.

Cost, counted in candidate sets (each reruns at most the n blocks from its first removed one, on
the search chunks): n one-shot + (K P - K (K - 1) / 2) greedy + at most SWAP_ROUNDS K (P - K)
swaps, P the pool size; plus one held-apart measurement per step. n = 32, K = 8 (P = 16): 32 +
100 + 3 x 64 = 324 sets at most, i.e. at most 10,368 block reruns per search chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..errors import QuantError
from .criteria import CRITERIA
from ..families.block_runner import BlockRunner

TAYLOR_PLUS_KEEP = (4, 2)   # first and last blocks Taylor+ never removes
SWAP_ROUNDS = 3             # at most this many improving exchanges after greedy


@dataclass
class Step:
    block: int                     # removed at this step
    search_ppl: float              # the search objective's value on the search chunks (PPL; KLD with "kld")
    held_ppl: float
    put_back: int | None = None    # a swap step: the block removed earlier and kept again
    removed: tuple[int, ...] = ()  # the set after this step


@dataclass
class Choice:
    how: str                       # "swaps", "greedy", "bi", "ppl", "taylor"
    removed: tuple[int, ...]
    held_ppl: float = float("nan")
    steps: list[Step] = field(default_factory=list)


def cheapest(scores: Sequence[float], k: int, protect: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    """The ``k`` lowest-scored blocks (ties: the lower index), leaving out the first/last
    ``protect`` blocks when at least ``k`` others remain."""
    n = len(scores)
    first, last = protect
    candidates = [b for b in range(n) if first <= b < n - last]
    if len(candidates) < k:
        candidates = list(range(n))
    return tuple(sorted(sorted(candidates, key=lambda b: (scores[b], b))[:k]))


def default_pool(n: int, k: int) -> int:
    """How many blocks the search may choose from: 2K, at least K + 4, at most every block."""
    return min(n, max(2 * k, k + 4))


def greedy_pool(ppl_scores: Sequence[float], k: int, size: int | None) -> list[int] | None:
    """The ``size`` blocks cheapest by one-shot PPL (at least ``k``; None: ``default_pool``), or
    None for all."""
    size = default_pool(len(ppl_scores), k) if size is None else size
    if size >= len(ppl_scores):
        return None
    return list(cheapest(ppl_scores, max(size, k)))


def one_shot(criterion: str, scores: Sequence[float], k: int) -> tuple[int, ...]:
    return cheapest(scores, k, TAYLOR_PLUS_KEEP if criterion == "taylor" else (0, 0))


def _objective(runner: BlockRunner, objective: str):
    """What the search lowers on its chunks: "ppl", or "kld" (from the full model's distribution)."""
    return runner.kld_many if objective == "kld" else runner.ppl_many


def _stage(runner, what: str) -> None:
    if hasattr(runner, "stage"):
        runner.stage = what


def _held_later(runner, sets, defer: bool) -> None:
    """Queue held-apart checks to ride along with the runner's next sweep (``defer``)."""
    if defer and hasattr(runner, "queue"):
        runner.queue(sets, runner.held)


def fill_held(runner, choices: Sequence[Choice], steps: bool = True) -> None:
    """Every choice's held-apart PPL (and each step's, with ``steps``) from one ``ppl_many`` call:
    one sweep for them all, none for the sets already measured along with the search's sweeps."""
    todo = [c for c in choices if c.held_ppl != c.held_ppl]   # NaN: not measured yet
    step_list = [s for c in choices for s in c.steps if s.held_ppl != s.held_ppl] if steps else []
    sets = [c.removed for c in todo] + [s.removed for s in step_list]
    if not sets:
        return
    _stage(runner, "held-apart checks")
    values = runner.ppl_many(sets, runner.held)
    for obj, value in zip([*todo, *step_list], values):
        obj.held_ppl = value
    for c in choices:   # a search's last step removed the choice's set
        if c.steps and c.steps[-1].removed == c.removed:
            c.steps[-1].held_ppl = c.held_ppl


def greedy(runner: BlockRunner, k: int, progress=None, pool: Sequence[int] | None = None,
           objective: str = "ppl", defer: bool = False, step_checks: bool = True) -> Choice:
    """Remove the block whose removal costs least, ``k`` times, re-measuring the rest each step.
    ``pool``: the blocks to try (default: all). Each step's held-apart PPL (only the last one's
    without ``step_checks``) is measured after the search in one sweep, or with ``defer`` queued to
    ride along with the next sweep (the caller then calls :func:`fill_held`)."""
    removed: list[int] = []
    steps = []
    pool = list(range(runner.n_blocks)) if pool is None else sorted(pool)
    for i in range(k):
        _stage(runner, f"greedy step {i + 1}")
        tried = [b for b in pool if b not in removed]
        trials = dict(zip(tried, _objective(runner, objective)([[*removed, b] for b in tried], runner.search,
                                                               progress)))
        best = min(trials, key=lambda b: (trials[b], b))
        removed.append(best)
        steps.append(Step(best, trials[best], float("nan"), removed=tuple(sorted(removed))))
        if step_checks or i == k - 1:
            _held_later(runner, [removed], defer)
    choice = Choice("greedy", tuple(sorted(removed)), steps=steps)
    if not defer:
        fill_held(runner, [choice], steps=step_checks)
    choice.held_ppl = steps[-1].held_ppl
    return choice


def swaps(runner: BlockRunner, start: Choice, progress=None, pool: Sequence[int] | None = None,
          rounds: int = SWAP_ROUNDS, objective: str = "ppl", defer: bool = False) -> Choice:
    """From ``start`` (greedy's set, its last step's search PPL), take the best exchange of a
    removed block for a kept ``pool`` block while it lowers the search PPL, at most ``rounds`` times.
    Never ends above ``start``'s search PPL. Held-apart checks as :func:`greedy`'s."""
    removed = set(start.removed)
    many = _objective(runner, objective)
    current = start.steps[-1].search_ppl if start.steps else many([removed], runner.search)[0]
    pool = list(range(runner.n_blocks)) if pool is None else sorted(pool)
    steps = []
    for r in range(rounds):
        _stage(runner, f"exchanges {r + 1}")
        moves = [(out, b) for out in sorted(removed) for b in pool if b not in removed]
        if not moves:
            break
        sets = [sorted(removed - {out} | {b}) for out, b in moves]
        trials = many(sets, runner.search, progress)
        j = min(range(len(moves)), key=lambda j: (trials[j], sets[j]))
        if not trials[j] < current:
            break
        current, removed = trials[j], set(sets[j])
        steps.append(Step(moves[j][1], current, float("nan"), put_back=moves[j][0], removed=tuple(sets[j])))
        _held_later(runner, [removed], defer)
    choice = Choice("swaps", tuple(sorted(removed)), steps=steps)
    if not defer:
        fill_held(runner, [choice])
    choice.held_ppl = steps[-1].held_ppl if steps else start.held_ppl
    return choice


def check_count(k: int, n_blocks: int) -> None:
    if not 0 < k < n_blocks:
        raise QuantError(f"--remove {k}: the model has {n_blocks} blocks; remove from 1 to {n_blocks - 1}")


def best_choice(runner: BlockRunner, choices: Sequence[Choice]) -> Choice:
    """The choice with the lowest held-apart PPL (measured here when not yet, all in one sweep);
    the first on ties."""
    fill_held(runner, choices, steps=False)
    return min(choices, key=lambda c: c.held_ppl)


def measure(runner, count: int, criterion: str, silent: bool, pool: int | None = None, objective: str = "ppl",
            taylor: bool = True, step_checks: bool = True):
    """Scores of every criterion, each criterion's one-shot set and (by default) the greedy and the
    swapped ones. ``pool``: how many blocks the search chooses from (None: ``default_pool``);
    ``objective``: what the search lowers (the final pick is always by held-apart PPL);
    ``taylor``: score Taylor+ too (a backward sweep: big models skip it by default, see cost.py);
    ``step_checks``: measure every search step's set on the held-apart chunks too, not only the
    final candidates. Held-apart checks ride along with the search's next sweep."""
    from tqdm import tqdm

    from .criteria import block_influence, one_shot_ppl
    from .criteria import taylor as taylor_scores

    n = runner.n_blocks
    scores = {"bi": block_influence(runner, runner.search)}
    _stage(runner, "one-shot ppl")
    with tqdm(total=n, desc="ppl, one block removed", unit="block", disable=silent, leave=False) as bar:
        scores["ppl"] = one_shot_ppl(runner, runner.search, bar)
    if taylor or criterion == "taylor":
        _stage(runner, "taylor")
        with tqdm(total=n, desc="taylor gradients", unit="block", disable=silent, leave=False) as bar:
            scores["taylor"] = taylor_scores(runner, runner.search, bar)
    criteria = [c for c in CRITERIA if c in scores]
    choices: dict[str, Choice] = {c: Choice(c, one_shot(c, scores[c], count)) for c in criteria}
    _held_later(runner, [(), *(c.removed for c in choices.values())], True)
    if criterion == "greedy":
        blocks = greedy_pool(scores["ppl"], count, pool)
        size = len(blocks or range(n))
        total = sum(size - i for i in range(count))
        with tqdm(total=total, desc="greedy search", unit="trial", disable=silent, leave=False) as bar:
            choices["greedy"] = greedy(runner, count, bar, blocks, objective, defer=True, step_checks=step_checks)
        with tqdm(total=SWAP_ROUNDS * count * (size - count), desc="swaps", unit="trial", disable=silent,
                  leave=False) as bar:
            choices["swaps"] = swaps(runner, choices["greedy"], bar, blocks, objective=objective, defer=True)
        fill_held(runner, [choices["greedy"], choices["swaps"]], steps=step_checks)
        choices["chosen"] = best_choice(runner, [choices["swaps"], choices["greedy"], *(choices[c] for c in criteria)])
    else:
        best_choice(runner, list(choices.values()))   # measures each set's held-apart PPL for the table
    choices["none"] = Choice("none", (), runner.ppl((), runner.held))
    return scores, choices
