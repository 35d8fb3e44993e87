"""Mixture-of-experts blocks: the experts a checkpoint really holds, as llama.cpp stacks them.

Expert pruning (REAP and its kin) removes experts from every block, slices the router's rows
and often leaves ``num_experts`` as it was. Here, as for blocks, the tensors decide: each
block's experts are found in either layout (one tensor per expert, or transformers 5's fused
``gate_up_proj`` / ``down_proj``), counted, checked against the router, and planned as
llama.cpp's ``ffn_gate_inp`` / ``ffn_{gate,up,down}_exps``. llama.cpp has one ``expert_count``
for the whole model: experts removed unevenly across blocks cannot be written (padding with
experts the router could pick would change the model), and neither can differing expert widths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import MODEL_TENSOR, GGUFValueType, Keys

from shortquant import keys
from shortquant.errors import ConfigError, WeightError
from shortquant.layers import _ranges
from shortquant.plan import BlockShape, MetaItem, Stack, TensorPlan


@dataclass(frozen=True)
class ExpertNames:
    """Where one layout keeps a block's router and experts (suffixes inside the block)."""

    router: str                      # (experts, hidden)
    experts: str                     # per-expert tensors: "<experts>.<e>.<gate|up|down>"
    gate: str
    up: str
    down: str
    fused_gate_up: str | None = None  # (experts, 2 * width, hidden), gate rows first
    fused_down: str | None = None     # (experts, hidden, width)


# transformers' Qwen2/Qwen3-MoE and (in transformers 5) Mixtral
MLP_EXPERTS = ExpertNames("mlp.gate.weight", "mlp.experts", "gate_proj.weight", "up_proj.weight",
                          "down_proj.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# Mixtral as published (transformers 4): w1 = gate, w3 = up, w2 = down
MIXTRAL_EXPERTS = ExpertNames("block_sparse_moe.gate.weight", "block_sparse_moe.experts", "w1.weight",
                              "w3.weight", "w2.weight")


@dataclass(frozen=True)
class ExpertBlock:
    """One block's experts as stored: count, width, and the planned source of each stacked tensor."""

    router: str
    count: int
    width: int
    gate: Stack
    up: Stack
    down: Stack | str                # a fused (experts, hidden, width) source is read as it is
    described: str                   # how the sources are named, for ``inspect``
    missing: tuple[int, ...] = ()    # expert indices absent from a per-expert layout (gaps)


def split_experts(blocks: dict[int, dict[str, str]], layouts: tuple[ExpertNames, ...], tensors,
                  folder) -> dict[int, ExpertBlock]:
    """Take every block's router and expert tensors out of ``blocks`` (in place) and describe
    them; errors name the block and the tensor."""
    found = {}
    for index in sorted(blocks):
        present = blocks[index]
        layout = next((n for n in layouts if n.router in present), None)
        if layout is None:
            raise WeightError(f"block {index} has no expert router (looked for "
                              f"{' or '.join(repr(n.router) for n in layouts)}); a dense block in a "
                              f"mixture-of-experts model is not supported", folder)
        found[index] = _read_block(index, present, layout, tensors, folder)
    return found


def _read_block(index: int, present: dict[str, str], names: ExpertNames, tensors, folder) -> ExpertBlock:
    def fail(problem):
        raise WeightError(f"block {index}: {problem}", folder)

    def shape(suffix):
        return tuple(tensors[present[suffix]].shape)

    router = present.pop(names.router)
    pattern = re.compile(rf"^{re.escape(names.experts)}\.(\d+)\.(.+)$")
    per_expert: dict[int, dict[str, str]] = {}
    for suffix in [s for s in present if pattern.match(s)]:
        m = pattern.match(suffix)
        if m.group(2) not in (names.gate, names.up, names.down):
            fail(f"unexpected tensor {present[suffix]!r}")
        per_expert.setdefault(int(m.group(1)), {})[m.group(2)] = present.pop(suffix)
    fused = [s for s in (names.fused_gate_up, names.fused_down) if s and s in present]
    hidden = tensors[router].shape[-1]
    if per_expert and fused:
        fail(f"holds experts both one tensor each and fused ({present[fused[0]]!r})")
    if fused:
        if len(fused) != 2:
            fail(f"has {present[fused[0]]!r} without its fused partner")
        gate_up, down = (present.pop(s) for s in (names.fused_gate_up, names.fused_down))
        (count, rows, cols), down_shape = tensors[gate_up].shape, tuple(tensors[down].shape)
        width = rows // 2
        if len(tensors[gate_up].shape) != 3 or rows % 2 or cols != hidden:
            fail(f"{gate_up!r} has shape {list(tensors[gate_up].shape)}, not [experts, 2 * width, {hidden}]")
        if down_shape != (count, hidden, width):
            fail(f"{down!r} has shape {list(down_shape)} but {gate_up!r} implies {[count, hidden, width]}")
        gate, up, down_stack = Stack((gate_up,), (0, width)), Stack((gate_up,), (width, rows)), down
        described, missing = f"{gate_up} / {down} (fused)", ()
    elif per_expert:
        order = sorted(per_expert)
        for e in order:
            lacking = [s for s in (names.gate, names.up, names.down) if s not in per_expert[e]]
            if lacking:
                fail(f"expert {e} is missing tensor {names.experts}.{e}.{lacking[0]!r}")
        count = len(order)
        width = tensors[per_expert[order[0]][names.gate]].shape[0]
        for e in order:
            got = [tuple(tensors[per_expert[e][s]].shape) for s in (names.gate, names.up, names.down)]
            if got != [(width, hidden), (width, hidden), (hidden, width)]:
                fail(f"expert {e} has shapes {[list(g) for g in got]} (gate, up, down); expert {order[0]} "
                     f"implies {[[width, hidden], [width, hidden], [hidden, width]]}")
        gate, up, down_stack = (Stack(tuple(per_expert[e][s] for e in order))
                                for s in (names.gate, names.up, names.down))
        described = f"{names.experts}.{{{_ranges(order)}}}"
        missing = tuple(e for e in range(order[-1] + 1) if e not in per_expert)
    else:
        fail(f"has a router ({router!r}) but no experts")
    if tuple(tensors[router].shape) != (count, hidden):
        fail(f"router {router!r} has shape {list(tensors[router].shape)} but the block holds {count} experts "
             f"(expected {[count, hidden]})")
    return ExpertBlock(router, count, width, gate, up, down_stack, described, missing)


def check_even(experts: dict[int, ExpertBlock], stored, folder) -> tuple[int, int]:
    """The one expert count and width every block has, or a one-line error naming the blocks."""
    for what, value in (("experts", lambda b: b.count), ("expert FFN widths", lambda b: b.width)):
        groups: dict[int, list[int]] = {}
        for index in stored:
            groups.setdefault(value(experts[index]), []).append(index)
        if len(groups) > 1:
            told = "; ".join(f"blocks {_ranges(blocks)}: {v}" for v, blocks in sorted(groups.items(),
                                                                                     key=lambda g: g[1][0]))
            raise WeightError(f"{what} differ across blocks ({told}); llama.cpp has one expert count and "
                              f"width for the whole model, so unevenly pruned experts cannot be written", folder)
    first = experts[stored[0]]
    return first.count, first.width


def expert_hparams(config: dict, path, count_keys: tuple[str, ...], width_key: str, hp: dict) -> dict:
    """The expert settings ``config.json`` states (checked); the count under the first of
    ``count_keys`` present (transformers 5 saves Qwen3-MoE's ``num_experts`` as
    ``num_local_experts``). ``plan_experts`` replaces the count by what the tensors hold."""
    def need(key):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"missing or invalid {key!r}", path)
        return value

    count_key = next((k for k in count_keys if k in config), count_keys[0])
    return {**hp, "n_expert": need(count_key), "n_expert_used": need("num_experts_per_tok"),
            "n_ff": need(width_key)}


def plan_experts(hp: dict, experts: dict[int, ExpertBlock], stored, shapes, config: dict, folder
                 ) -> tuple[tuple[BlockShape, ...], list[str]]:
    """Block shapes with their experts, ``hp`` set from the tensors; warnings where config.json
    disagrees (a stale ``num_experts`` is followed as a stale ``num_hidden_layers`` is)."""
    count, width = check_even(experts, stored, folder)
    warnings = []
    if hp["n_expert"] != count:
        warnings.append(f"config says {hp['n_expert']} experts per block but the tensors hold {count}; "
                        f"following the tensors (expert_count={count})")
        if hp["n_expert"] > count:
            hp["source_expert_count"] = hp["n_expert"]
    if hp["n_expert_used"] > count:
        raise WeightError(f"config.json: num_experts_per_tok={hp['n_expert_used']} but the blocks hold only "
                          f"{count} experts", folder)
    hp["n_expert"] = count   # the config's width is compared with the tensors' by the planner
    shapes = tuple(BlockShape(s.n_head, s.n_head_kv, width, count) for s in shapes)
    return shapes, warnings


def expert_tensors(block: ExpertBlock, n: int, name, hidden: int) -> list[TensorPlan]:
    """The router (E, H) and the stacked gate / up (E, F, H) and down (E, H, F) of ``blk.n``."""
    w, e = block.width, block.count
    plans = [TensorPlan(name(MODEL_TENSOR.FFN_GATE_INP, n), block.router, (e, hidden), MODEL_TENSOR.FFN_GATE_INP)]
    for kind, stack, what, shape in ((MODEL_TENSOR.FFN_GATE_EXP, block.gate, "gate", (e, w, hidden)),
                                     (MODEL_TENSOR.FFN_UP_EXP, block.up, "up", (e, w, hidden)),
                                     (MODEL_TENSOR.FFN_DOWN_EXP, block.down, "down", (e, hidden, w))):
        if isinstance(stack, str):
            plans.append(TensorPlan(name(kind, n), stack, shape, kind))
        else:
            plans.append(TensorPlan(name(kind, n), f"{block.described} {what}", shape, kind, stack=stack))
    return plans


def removed_experts(config: dict, experts: dict[int, ExpertBlock], block_map, folder) -> list[list[int]] | None:
    """Per written block, the source experts that were removed, when known: from
    ``config.json``'s ``removed_experts`` ({"block": [experts]}, block indices as stored) or
    from gaps in the per-expert tensor names; None when nothing says."""
    listed = config.get("removed_experts")
    if listed is not None and not isinstance(listed, dict):
        raise WeightError("config.json: removed_experts must map block indices to lists of experts", folder)
    out = []
    for stored in block_map.stored:
        gaps = list(experts[stored].missing)
        if listed is not None:
            said = listed.get(str(stored), [])
            if not isinstance(said, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in said):
                raise WeightError(f"config.json: removed_experts[{str(stored)!r}] must be a list of expert indices",
                                  folder)
            if not set(gaps) <= set(said):
                raise WeightError(f"block {stored}: config.json's removed_experts says {sorted(said)} but expert "
                                  f"tensors {gaps} are missing", folder)
            gaps = sorted(said)
        out.append(gaps)
    return out if any(out) else None


def expert_metadata(hp: dict, key, *, width_key: bool) -> list[MetaItem]:
    """llama.cpp's expert keys (``width_key``: the arch reads ``expert_feed_forward_length``)."""
    U, L = GGUFValueType.UINT32, Keys.LLM
    items = [MetaItem(key(L.EXPERT_COUNT), hp["n_expert"], U),
             MetaItem(key(L.EXPERT_USED_COUNT), hp["n_expert_used"], U)]
    if width_key:
        items.append(MetaItem(key(L.EXPERT_FEED_FORWARD_LENGTH), hp["n_ff"], U))
    return items


def expert_provenance(hp: dict, removed: list[list[int]] | None) -> list[MetaItem]:
    """Our record of pruned experts: which were removed per block, and how many there were."""
    items = []
    if removed is not None:
        items.append(MetaItem(keys.REMOVED_EXPERTS, [",".join(map(str, r)) for r in removed],
                              GGUFValueType.ARRAY, GGUFValueType.STRING))
    if hp.get("source_expert_count"):
        items.append(MetaItem(keys.SOURCE_EXPERT_COUNT, hp["source_expert_count"], GGUFValueType.UINT32))
    return items
