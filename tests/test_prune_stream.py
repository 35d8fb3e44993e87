"""``prune``'s runner with streamed blocks (read from the checkpoint one at a time) against the
resident model: the same kept inputs, NLLs and criteria; and its block-major ``nll_many`` (all
candidate sets in one sweep, shared prefixes computed once) against each set rerun on its own
(the kept input of its first removed block, then every later kept block)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import pruned
from conftest import DEMO
from reader_cases import CASES

CALIB = "The old lighthouse keeper climbed the stairs every evening and lit the lamp. " * 12


def runners(folder: Path, chunks=3, ctx=24, held_apart=1):
    from shortquant.families.hf_model import load_torch_model
    from shortquant.families.block_runner import BlockRunner
    from shortquant.quant.imatrix import chunk_tokens
    from shortquant.tokenizer.encode import encode_text

    ids, bos = encode_text(folder, CALIB)
    pieces = chunk_tokens(ids, ctx=ctx, chunks=chunks, bos_id=bos)
    return (BlockRunner(load_torch_model(folder), pieces, held_apart),
            BlockRunner(load_torch_model(folder, stream_blocks=True), pieces, held_apart))


def close(a, b, rel=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=rel), (a, b)


def candidate_sets(n: int) -> list[frozenset]:
    """Singles, pairs sharing a first block, a duplicate, the empty set, the last block alone."""
    sets = [frozenset({b}) for b in range(n)] + [frozenset(), frozenset({0, n - 1}), frozenset({0, 1})]
    return sets + [frozenset({1, n - 1}), frozenset({0, n - 1})]


def rerun_alone(runner, removed, split) -> float:
    """The set's NLL the plain way, one chunk after another: no sweep, nothing shared."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in split.indices:
            first = min(removed, default=runner.n_blocks)
            h = runner.inputs[first][i]
            for b in range(first, runner.n_blocks):
                if b not in removed:
                    with runner.block(b):
                        h = runner.run_block(b, i, h)
            total += float(runner.chunk_nll(i, h).double())
            count += runner.chunks[i].shape[1] - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def demo_pair():
    return runners(DEMO, chunks=3, ctx=40)


def test_streamed_blocks_are_released_and_the_head_stays(demo_pair):
    _, streamed = demo_pair
    assert streamed.weights is not None
    assert all(p.is_meta for layer in streamed.layers for p in layer.parameters())
    assert not any(p.is_meta for p in streamed.model.lm_head.parameters())


def test_streamed_equals_resident_on_the_demo(demo_pair):
    from shortquant.prune.criteria import block_influence, taylor

    resident, streamed = demo_pair
    for b in range(resident.n_blocks + 1):
        for x, y in zip(resident.inputs[b], streamed.inputs[b]):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    sets = candidate_sets(resident.n_blocks)
    close(streamed.ppl_many(sets, streamed.search), resident.ppl_many(sets, resident.search))
    close(streamed.ppl_many(sets[:3], streamed.held), resident.ppl_many(sets[:3], resident.held))
    close(block_influence(streamed, streamed.search), block_influence(resident, resident.search))
    close(taylor(streamed, streamed.search), taylor(resident, resident.search))


def test_block_major_sweep_equals_each_set_rerun_alone(demo_pair):
    resident, streamed = demo_pair
    sets = candidate_sets(resident.n_blocks)
    for runner in (resident, streamed):
        close(runner.ppl_many(sets, runner.search), [rerun_alone(runner, s, runner.search) for s in sets], rel=1e-9)


@pytest.mark.parametrize("case", ["sharded-bf16-safetensors", "qwen2-gaps-tied", "decilm"])
def test_streamed_equals_resident_with_block_gaps_and_per_block_shapes(tmp_path, case):
    CASES[case](tmp_path / case)
    resident, streamed = runners(tmp_path / case)
    sets = candidate_sets(resident.n_blocks)
    close(streamed.ppl_many(sets, streamed.search), resident.ppl_many(sets, resident.search))
    close(streamed.ppl_many(sets, streamed.search), [rerun_alone(streamed, s, streamed.search) for s in sets],
          rel=1e-9)


def test_a_missing_block_tensor_is_refused_when_the_streamed_model_is_built(tmp_path):
    from safetensors.torch import load_file, save_file

    from shortquant.errors import WeightError
    from shortquant.families.hf_model import load_torch_model

    CASES["gaps"](tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightError, match="block 3.*'mlp.up_proj.weight'"):
        load_torch_model(tmp_path, stream_blocks=True)


def test_stream_policy_follows_the_float32_size(tmp_path):
    from shortquant.families.block_runner import stream_blocks
    from shortquant.source.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(DEMO)
    f32 = 4 * sum(t.n_elements for t in checkpoint.tensors.values())
    assert stream_blocks(checkpoint, available=3 * f32)
    assert not stream_blocks(checkpoint, available=5 * f32)


def test_cost_policy_keeps_small_models_and_cuts_big_deep_ones():
    from shortquant.prune.cost import MIN_SEARCH_CTX, TARGET_RATIO, choose, greedy_pool_size, predicted_ratio

    small = choose(30, 6, None, None, None, None, params=1.35e8, streamed=False)   # SmolLM2-135M: untouched
    assert (small.search_chunks, small.search_ctx, small.held, small.held_ctx) == (12, 256, 4, 256)
    assert (small.pool, small.taylor, small.step_checks, small.reduced) == (None, True, True, False)
    deep = choose(32, 8, None, None, None, None, params=6.7e9, streamed=True)   # LLaMA-7B, --remove 8
    assert deep.reduced and deep.ratio <= TARGET_RATIO
    assert (deep.search_chunks, deep.held, deep.held_ctx, deep.pool) == (1, 1, 256, greedy_pool_size(32, 8))
    assert not deep.taylor and not deep.step_checks and MIN_SEARCH_CTX <= deep.search_ctx < 256
    assert deep.ratio == predicted_ratio(32, 8, deep.search_ctx, 256, deep.pool, True, taylor=False,
                                         step_checks=False)
    # each cut only as far as needed: 16 more searched tokens would not fit
    assert predicted_ratio(32, 8, deep.search_ctx + 16, 256, deep.pool, True, taylor=False,
                           step_checks=False) > TARGET_RATIO
    eight = choose(8, 2, None, None, None, None, params=2.2e9, streamed=True)    # 8 LLaMA-7B blocks
    assert eight.reduced and eight.ratio <= TARGET_RATIO and eight.search_ctx == 256
    # what the user gave is kept; only the rest is cut
    given = choose(32, 8, 256, 16, None, 32, params=6.7e9, streamed=True, taylor=True)
    assert (given.search_chunks + given.held, given.search_ctx, given.pool, given.taylor) == (16, 256, 32, True)
    assert given.ratio > TARGET_RATIO and given.cuts == ("step checks",)


def test_queued_held_checks_ride_along_with_the_next_sweep_and_give_the_same_numbers(demo_pair):
    resident, streamed = demo_pair
    n = resident.n_blocks
    searched = [frozenset({b, n - 1}) for b in range(n - 1)]
    held = [frozenset({1}), frozenset({0, 2}), frozenset({3, 4}), frozenset()]
    for runner in (resident, streamed):
        runner.known.clear()
        apart = runner.ppl_many(searched, runner.search), runner.ppl_many(held, runner.held)
        runner.known.clear()
        sweeps = len(runner.costs)
        runner.queue(held, runner.held)
        together = runner.ppl_many(searched, runner.search)
        assert len(runner.costs) == sweeps + 1 and runner.costs[-1]["what"].endswith("search + held-apart")
        assert together == apart[0]   # the same operations on the same tensors: equal, not only close
        assert runner.ppl_many(held, runner.held) == apart[1] and len(runner.costs) == sweeps + 1
        close(apart[1], [rerun_alone(runner, s, runner.held) for s in held], rel=1e-9)


def test_the_search_makes_the_sweeps_the_cost_model_counts(demo_pair):
    from shortquant.prune.cost import sweeps
    from shortquant.prune.search import measure

    resident, streamed = demo_pair
    for taylor, step_checks in ((True, True), (False, False)):
        streamed.known.clear()
        before = len(streamed.costs)
        scores, choices = measure(streamed, 2, "greedy", silent=True, taylor=taylor, step_checks=step_checks)
        extra = len(choices["swaps"].steps)   # each exchange taken adds a round
        assert extra < 3 and len(streamed.costs) - before == sweeps(2, True, taylor) - 1 + extra, streamed.costs
        assert ("taylor" in scores) == taylor
        measured = [s.held_ppl == s.held_ppl for s in choices["greedy"].steps]
        assert measured == ([True, True] if step_checks else [False, True])
        # the folded checks give what a check of its own gives
        for c in ("greedy", "swaps", "bi", "ppl", "none"):
            close([choices[c].held_ppl], [rerun_alone(streamed, choices[c].removed, streamed.held)], rel=1e-9)


def batching_agrees(folder: Path) -> None:
    """run_block_many (states stacked into batched calls) against one run_block call per state,
    on every block, with chunks of two lengths (never stacked together)."""
    from shortquant.families.block_runner import BlockRunner
    from shortquant.families.hf_model import load_torch_model

    model = load_torch_model(folder)
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randint(vocab, (n,), generator=gen).tolist() for n in (24, 24, 24, 16)]
    runner = BlockRunner(model, chunks)
    assert [runner._alike(0, i) for i in range(4)] == [0, 0, 0, 3]
    with torch.no_grad():
        for b in range(runner.n_blocks):
            items = [(i, runner.inputs[b][i] * (1 + 0.1 * k)) for k in range(3) for i in range(4)]
            many = runner.run_block_many(b, items)
            for (i, h), got in zip(items, many):
                assert torch.allclose(got, runner.run_block(b, i, h), rtol=1e-5, atol=1e-6), (b, i)
            for i in range(4):   # the reference pass's batched inputs are what one call gives
                want = runner.run_block(b, i, runner.inputs[b][i])
                assert torch.allclose(runner.inputs[b + 1][i], want, rtol=1e-5, atol=1e-6), (b, i)


@pytest.mark.parametrize("case", ["gaps", "qwen2-gaps-tied", "qwen3-gaps-head_dim", "mistral-gaps", "llama3-gaps",
                                  "decilm", "attention-mlp-dropped"])
def test_batched_block_calls_give_what_one_call_per_state_gives(tmp_path, case):
    CASES[case](tmp_path / case)
    batching_agrees(tmp_path / case)


@pytest.mark.parametrize("family", ["nemotron", "qwen3moe", "mixtral"])
def test_batched_block_calls_agree_for_nemotron_and_mixtures_of_experts(tmp_path, family):
    from families import build_family_model
    from moe_models import build_moe_model, save_layout

    if family == "nemotron":
        build_family_model("nemotron", 300, layers=2).save_pretrained(tmp_path)
    else:
        save_layout(build_moe_model(family, 300, layers=2, hidden_size=64, intermediate_size=64,
                                    **({"moe_intermediate_size": 64, "head_dim": 16} if family == "qwen3moe" else {})),
                    tmp_path, "fused")
    batching_agrees(tmp_path)
