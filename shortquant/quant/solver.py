"""Choosing one type per tensor under a byte budget (a multiple-choice knapsack).

Every tensor has options ``(type, bytes, cost)``: what the type costs on disk (padding
included) and its predicted contribution to the KL divergence. The solver minimises the total
cost with the total bytes at most the budget. It walks each tensor's lower convex hull of
(bytes, cost), always taking the upgrade that buys the most cost per byte (the Lagrangian
greedy, optimal up to the last upgrade that no longer fits), then spends what is left on the
single changes that help most. Ties are broken by tensor name and type name, so the same
inputs always give the same mix.

>>> from gguf import GGMLQuantizationType as T
>>> opts = {"a": [Option(T.Q4_K, 10, 5.0), Option(T.Q6_K, 14, 1.0)],
...         "b": [Option(T.Q4_K, 10, 2.0), Option(T.Q6_K, 14, 1.5)]}
>>> {k: v.name for k, v in solve(opts, 24).items()}
{'a': 'Q6_K', 'b': 'Q4_K'}
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Mapping, Sequence

from gguf import GGMLQuantizationType as T

from ..errors import QuantError


@dataclass(frozen=True)
class Option:
    qtype: T
    bytes: int
    cost: float


class BudgetTooSmall(QuantError):
    """The budget is below what the smallest types can reach."""

    def __init__(self, budget: int, smallest: int, what: str = "the file"):
        self.budget, self.smallest = budget, smallest
        super().__init__(f"a budget of {budget:,} bytes for {what} is below the smallest reachable "
                         f"size, {smallest:,} bytes")


def _useful(options: Sequence[Option]) -> list[Option]:
    """Options by size, dropping any that costs as much as a smaller one."""
    out: list[Option] = []
    for opt in sorted(options, key=lambda o: (o.bytes, o.cost, o.qtype.name)):
        if not out or opt.cost < out[-1].cost:
            if out and opt.bytes == out[-1].bytes:
                out[-1] = opt
            else:
                out.append(opt)
    return out


def _hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (bytes, cost), smallest first (options already _useful)."""
    hull: list[Option] = []
    for opt in options:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the line from a to opt: never the best step, drop it
            if (b.cost - a.cost) * (opt.bytes - a.bytes) >= (opt.cost - a.cost) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(opt)
    return hull


def smallest_bytes(options: Mapping[str, Sequence[Option]]) -> int:
    return sum(min(o.bytes for o in opts) for opts in options.values())


def total(choice: Mapping[str, T], options: Mapping[str, Sequence[Option]]) -> tuple[int, float]:
    """(bytes, cost) of a choice."""
    by_type = {name: {o.qtype: o for o in opts} for name, opts in options.items()}
    picked = [by_type[name][qtype] for name, qtype in choice.items()]
    return sum(o.bytes for o in picked), sum(o.cost for o in picked)


def solve(options: Mapping[str, Sequence[Option]], budget: int,
          start: Mapping[str, T] | None = None) -> dict[str, T]:
    """The type of every tensor, total bytes <= ``budget``, least total cost found.

    ``start`` (say, a standard mix within the budget) is a second starting point: the result
    is never predicted worse than it. Raises BudgetTooSmall when even the smallest options
    do not fit.
    """
    names = sorted(options)
    useful = {n: _useful(options[n]) for n in names}
    smallest = sum(u[0].bytes for u in useful.values())
    if smallest > budget:
        raise BudgetTooSmall(budget, smallest, "the tensors")

    hulls = {n: _hull(useful[n]) for n in names}
    current = {n: hulls[n][0] for n in names}
    step = {n: 0 for n in names}
    left = budget - smallest
    heap = []

    def push(n: str) -> None:
        i = step[n]
        if i + 1 < len(hulls[n]):
            a, b = hulls[n][i], hulls[n][i + 1]
            heapq.heappush(heap, (-(a.cost - b.cost) / (b.bytes - a.bytes), n))

    for n in names:
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        a, b = hulls[n][step[n]], hulls[n][step[n] + 1]
        if b.bytes - a.bytes > left:
            continue   # this tensor's next upgrade no longer fits; the fill pass may still help
        left -= b.bytes - a.bytes
        current[n] = b
        step[n] += 1
        push(n)
    best = _fill(current, useful, left)

    if start is not None:
        by_type = {n: {o.qtype: o for o in options[n]} for n in names}
        begin = {n: by_type[n][start[n]] for n in names}
        used = sum(o.bytes for o in begin.values())
        if used <= budget:
            other = _fill(begin, useful, budget - used)
            if sum(o.cost for o in other.values()) < sum(o.cost for o in best.values()):
                best = other
    return {n: best[n].qtype for n in names}


def _fill(current: Mapping[str, Option], useful: Mapping[str, list[Option]], left: int) -> dict[str, Option]:
    """Spend ``left`` bytes on the single changes that lower the cost most, one at a time."""
    current = dict(current)
    while True:
        best = None
        for n in sorted(current):
            cur = current[n]
            for opt in useful[n]:
                extra = opt.bytes - cur.bytes
                gain = cur.cost - opt.cost
                if gain > 0 and extra <= left and (best is None or gain > best[0]):
                    best = (gain, n, opt)
        if best is None:
            return current
        _, n, opt = best
        left -= opt.bytes - current[n].bytes
        current[n] = opt
