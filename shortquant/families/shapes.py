"""Each block's own shapes, read from its tensors (never from a possibly stale config).

Width pruning (LLM-Pruner, FLAP, Minitron) leaves every block with its own head count, KV-head
count and FFN width, and saves the original ``config.json``; sub-block dropping (LLM-Drop) removes
a block's attention or MLP tensors; DeciLM (Nemotron-51B/49B/253B) says the same in
``block_configs``. Here the tensors decide, and what the config claims is checked against them.
"""

from __future__ import annotations

from shortquant.errors import WeightError
from shortquant.plan import BlockShape

ATTN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight")
MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
ATTN_NORM, FFN_NORM = "input_layernorm.weight", "post_attention_layernorm.weight"
LINEAR_ATTN = "self_attn.linear_attn.weight"   # DeciLM's replace_with_linear attention


def read_block_shapes(blocks: dict[int, dict[str, str]], stored, tensors, hp: dict, config: dict,
                      folder, gateless: bool = False) -> tuple[BlockShape, ...]:
    """The shape of every stored block (in ``stored`` order), checked; errors name block and tensor.
    ``gateless``: the family's MLP is up and down projections only."""
    def fail(index, problem):
        raise WeightError(f"block {index}: {problem}", folder)

    def rows(index, suffix):
        return tensors[blocks[index][suffix]].shape[0]

    def need(index, suffix):
        if suffix not in blocks[index]:
            raise WeightError(f"block {index} is missing tensor {suffix!r}", folder)

    head_dim, d = hp["head_dim"], hp["n_embd"]
    shapes = []
    for index in stored:
        present = blocks[index]
        attn = [s for s in ATTN if s in present]
        if LINEAR_ATTN in present:
            if attn:
                fail(index, f"has both {LINEAR_ATTN!r} and {attn[0]!r}")
            need(index, ATTN_NORM)
            if tuple(tensors[present[LINEAR_ATTN]].shape) != (d, d):
                fail(index, f"{LINEAR_ATTN!r} has shape {list(tensors[present[LINEAR_ATTN]].shape)}, not {[d, d]}")
            n_head, n_head_kv = hp["n_head"], 0
        elif not attn:
            n_head = n_head_kv = 0
        else:
            for suffix in ATTN + (ATTN_NORM,):
                need(index, suffix)
            q, k, v = (rows(index, s) for s in ATTN[:3])
            if q % head_dim:
                fail(index, f"{ATTN[0]!r} has {q} rows, not a multiple of head_dim {head_dim}")
            if k != v:
                fail(index, f"{ATTN[1]!r} has {k} rows but {ATTN[2]!r} has {v}")
            if k % head_dim:
                fail(index, f"{ATTN[1]!r} has {k} rows, not a multiple of head_dim {head_dim}")
            n_head, n_head_kv = q // head_dim, k // head_dim
            if not n_head or not n_head_kv:
                fail(index, f"{ATTN[0]!r} has {q} rows and {ATTN[1]!r} {k}: no whole head")
            if n_head % n_head_kv:
                fail(index, f"{n_head} attention heads ({ATTN[0]!r}) are not a multiple of {n_head_kv} KV heads "
                            f"({ATTN[1]!r})")
        mlp = [s for s in MLP if s in present]
        if not mlp:
            n_ff = 0
        else:
            gated = MLP[0] in present or not gateless
            for suffix in (MLP if gated else MLP[1:]) + (FFN_NORM,):
                need(index, suffix)
            up = rows(index, MLP[1])
            gate = rows(index, MLP[0]) if gated else up   # Nemotron's MLP has no gate
            down = tensors[present[MLP[2]]].shape
            if not (gate == up == (down[1] if len(down) > 1 else -1)):
                fail(index, f"FFN widths disagree: {MLP[0]!r} has {gate} rows, {MLP[1]!r} {up}, "
                            f"{MLP[2]!r} {down[1] if len(down) > 1 else '?'} columns")
            n_ff = gate
        shapes.append(BlockShape(n_head, n_head_kv, n_ff))
    check_drop_lists(config, blocks, stored, shapes, folder)
    return tuple(shapes)


def check_drop_lists(config: dict, blocks, stored, shapes, folder) -> None:
    """LLM-Drop's ``drop_attn_list`` / ``drop_mlp_list`` (block indices as stored) must name blocks
    whose attention / MLP tensors are really gone."""
    for key, parts, absent in (("drop_attn_list", ATTN, lambda s: s.n_head == 0),
                               ("drop_mlp_list", MLP, lambda s: s.n_ff == 0)):
        listed = config.get(key) or []
        if not isinstance(listed, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
            raise WeightError(f"config.json: {key} must be a list of block indices", folder)
        for index in listed:
            if index not in blocks:
                continue        # the whole block was removed as well
            if not absent(shapes[list(stored).index(index)]):
                name = next(blocks[index][p] for p in parts if p in blocks[index])
                raise WeightError(f"block {index}: {key} names it but it still has tensor {name!r}", folder)


def removed_sub_blocks(shapes) -> tuple[list[int], list[int]]:
    """Written block indices without attention, and without an MLP."""
    return ([n for n, s in enumerate(shapes) if s.n_head == 0],
            [n for n, s in enumerate(shapes) if s.n_ff == 0])


def uniform(shapes) -> bool:
    """Every block has full attention and an MLP, all of the same shapes (llama.cpp's per-model keys suffice)."""
    return len(set(shapes)) == 1 and all(s.n_head and s.n_head_kv and s.n_ff for s in shapes)


def why_per_layer(shapes) -> str:
    """Why these shapes need per-layer keys, in words."""
    reasons = []
    no_attn, no_mlp = removed_sub_blocks(shapes)
    linear = [n for n, s in enumerate(shapes) if s.n_head and not s.n_head_kv]
    if no_attn:
        reasons.append(f"no attention in blocks {no_attn}")
    if linear:
        reasons.append(f"linear attention in blocks {linear}")
    if no_mlp:
        reasons.append(f"no MLP in blocks {no_mlp}")
    full = [s for s in shapes if s.n_head and s.n_head_kv]
    if len({(s.n_head, s.n_head_kv) for s in full}) > 1:
        reasons.append("head counts differ (" + ", ".join(sorted({f"{s.n_head}/{s.n_head_kv}" for s in full})) + ")")
    widths = sorted({s.n_ff for s in shapes if s.n_ff})
    if len(widths) > 1:
        reasons.append(f"FFN widths differ ({widths[0]}..{widths[-1]})")
    return "; ".join(reasons)


# transformers' per_layer_config "skip" names for a removed sub-block
_SKIP = {"attention": "attn", "self_attn": "attn", "attn": "attn", "mlp": "mlp", "ffn": "mlp"}


def per_layer_config_shapes(config: dict, hp: dict, count: int, folder) -> list[BlockShape]:
    """The shapes transformers' ``per_layer_config`` declares for layers ``0..count-1``: sparse
    overrides of ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` and
    ``skip`` of whole sub-blocks, on top of the global config."""
    table = config["per_layer_config"]
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise WeightError("config.json: per_layer_config must map layer indices to objects", folder)
    try:
        layers = {int(k): v for k, v in table.items()}
    except ValueError:
        raise WeightError("config.json: per_layer_config keys must be layer indices", folder) from None
    outside = sorted(i for i in layers if not 0 <= i < count)
    if outside:
        raise WeightError(f"config.json: per_layer_config names layer {outside[0]} but the config has {count}", folder)
    known = {"num_attention_heads", "num_key_value_heads", "intermediate_size", "skip", "head_dim"}
    out = []
    for i in range(count):
        over = layers.get(i, {})
        extra = sorted(set(over) - known)
        if extra:
            raise WeightError(f"config.json: per_layer_config[{i}] sets {extra[0]!r}, which llama.cpp cannot hold "
                              f"per layer", folder)
        if over.get("head_dim", hp["head_dim"]) != hp["head_dim"]:
            raise WeightError(f"config.json: per_layer_config[{i}] changes head_dim; llama.cpp has one head size",
                              folder)
        skip = over.get("skip", [])
        if isinstance(skip, str) or not all(s in _SKIP for s in skip):
            raise WeightError(f"config.json: per_layer_config[{i}] skip must be a list of {sorted(_SKIP)}", folder)
        skipped = {_SKIP[s] for s in skip}
        n_head = over.get("num_attention_heads", hp["n_head"])
        n_kv = over.get("num_key_value_heads", config.get("num_key_value_heads") or n_head)
        n_ff = over.get("intermediate_size", config.get("intermediate_size"))
        out.append(BlockShape(0 if "attn" in skipped else n_head, 0 if "attn" in skipped else n_kv,
                              0 if "mlp" in skipped else n_ff))
    return out


def check_per_layer_config(config: dict, hp: dict, shapes, stored, folder) -> None:
    """transformers' ``per_layer_config``, when present, must describe exactly the blocks found
    (layer indices as stored: a gap is a removed layer)."""
    if "per_layer_config" not in config:
        return
    count = max(config.get("num_hidden_layers") or 0, max(stored) + 1)
    declared = per_layer_config_shapes(config, hp, count, folder)
    for index, got in zip(stored, shapes):
        if declared[index] != got:
            raise WeightError(f"block {index}: per_layer_config says {declared[index].describe()} but its tensors "
                              f"hold {got.describe()}", folder)
