"""ggml's decoder, the Q/K un-permutation and the byte-budget solver behind optimized mixes."""

from __future__ import annotations

import itertools
import random

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from shortquant.ggml import dequantize, quantize
from shortquant.quant.solver import BudgetTooSmall, Option, solve, total
from shortquant.transforms import permute_rotary, unpermute_rotary


# -- ggml decoding ---------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_1, T.IQ4_NL, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K,
                                   T.Q6_K, T.IQ4_XS, T.IQ3_S, T.F16, T.BF16])
def test_dequantize_matches_gguf_py(qtype):
    w = np.random.default_rng(int(qtype)).standard_normal((6, 512)).astype(np.float32)
    encoded = quantize(w, qtype)
    ours = dequantize(encoded, qtype, 512)
    reference = gguf.quants.dequantize(encoded, qtype).reshape(6, 512)
    np.testing.assert_array_equal(ours, reference.astype(np.float32))


def test_unpermute_inverts_permute():
    w = np.arange(8 * 32 * 3, dtype=np.float32).reshape(8 * 32, 3)
    for heads in (1, 2, 8):
        np.testing.assert_array_equal(unpermute_rotary(permute_rotary(w, heads), heads), w)


# -- the solver ------------------------------------------------------------------------------
def random_options(seed: int, n: int = 5):
    rng = random.Random(seed)
    types = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
    out = {}
    for i in range(n):
        size, cost = rng.randint(10, 40), rng.uniform(1, 10)
        opts = []
        for q in types:
            opts.append(Option(q, size, cost))
            size += rng.randint(1, 20)
            cost *= rng.uniform(0.2, 1.05)   # sometimes a bigger type is worse: must be skipped
        out[f"t{i}"] = opts
    return out


def brute_force(options, budget):
    names = sorted(options)
    best = None
    for combo in itertools.product(*(options[n] for n in names)):
        size = sum(o.bytes for o in combo)
        cost = sum(o.cost for o in combo)
        if size <= budget and (best is None or cost < best):
            best = cost
    return best


@pytest.mark.parametrize("seed", range(12))
def test_solver_within_budget_and_near_optimal(seed):
    options = random_options(seed)
    smallest = sum(min(o.bytes for o in opts) for opts in options.values())
    largest = sum(max(o.bytes for o in opts) for opts in options.values())
    budget = random.Random(seed).randint(smallest, largest)
    choice = solve(options, budget)
    size, cost = total(choice, options)
    assert size <= budget
    optimum = brute_force(options, budget)
    assert cost <= optimum * 1.25 + 1e-9, (cost, optimum)
    assert solve(options, budget) == choice   # same inputs, same mix


def test_solver_never_worse_than_its_start():
    for seed in range(12):
        options = random_options(seed, 6)
        start = {n: opts[2].qtype for n, opts in options.items()}
        budget = total(start, options)[0]
        choice = solve(options, budget, start)
        assert total(choice, options)[0] <= budget
        assert total(choice, options)[1] <= total(start, options)[1] + 1e-12


def test_solver_refuses_unreachable_budget():
    options = random_options(0)
    smallest = sum(min(o.bytes for o in opts) for opts in options.values())
    with pytest.raises(BudgetTooSmall) as info:
        solve(options, smallest - 1)
    assert info.value.smallest == smallest
