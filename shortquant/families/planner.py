"""The shared planner: one function turns any family's checkpoint into a ``ModelPlan``.

Block discovery and the block map, the tensor list with its shape checks, naming, general
metadata, provenance and the tokenizer are the same for every family; the family supplies its
tensor table, hyper-parameters and quirks (``family.Family``).
"""

from __future__ import annotations

from dataclasses import replace

import gguf
from gguf import MODEL_TENSOR, GGUFValueType, Keys

from shortquant import __version__, keys
from shortquant.errors import WeightError
from shortquant.naming import make_naming
from shortquant.plan import BlockShape, MetaItem, ModelPlan, TensorPlan, Transform

from . import deci, moe
from .family import Family
from .hparams import hparam_metadata
from .layout import read_layout, sub_block
from .shapes import LINEAR_ATTN, uniform, why_per_layer


def gguf_name(kind: MODEL_TENSOR, block: int | None = None, suffix: str = "weight") -> str:
    """``blk.3.attn_q.weight`` for (ATTN_Q, 3); the names are gguf-py's."""
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=block) if block is not None else base) + "." + suffix


def plan_model(family: Family, checkpoint, options) -> ModelPlan:
    """Plan the GGUF for ``checkpoint`` as ``family`` (no weights read)."""
    layout = read_layout(checkpoint, family, source_blocks=options.source_blocks, recipe=options.recipe,
                         remove_blocks=getattr(options, "remove_blocks", None),
                         pruning_method=getattr(options, "pruning_method", None))
    checkpoint = layout.checkpoint   # with --remove-blocks: read as if saved without those blocks
    recipe, hp, blocks, block_map, shapes = options.recipe, dict(layout.hp), layout.blocks, layout.block_map, \
        layout.shapes
    table = {**family.block_tensors, **family.optional_block_tensors}
    embed, final_norm, lm_head, vocab = family.embed, family.final_norm, family.lm_head, hp["vocab_size"]
    warnings = list(block_map.warnings) + list(layout.warnings)
    # FFN padding: None (default) pads the widths pruning changed (not config.json's) to 256
    pad = getattr(options, "pad_ffn", None)
    pad, pad_unless = (256, hp["n_ff"]) if pad is None else (pad, None)
    written = padded(shapes, pad, pad_unless)
    arch, arch_reason = family.arch, None
    if uniform(shapes):
        warnings += stale_width_warnings(hp, shapes[0])
        hp.update(n_head=shapes[0].n_head, n_head_kv=shapes[0].n_head_kv, n_ff=written[0].n_ff)
    else:
        arch_reason = why_per_layer(shapes)
        if family.per_layer_arch is None:
            raise WeightError(f"the blocks differ ({arch_reason}); llama.cpp has per-layer shapes only for "
                              f"LLaMA-style models (deci), not for {family.arch_name}", checkpoint.folder)
        if not any(s.n_head for s in shapes):
            raise WeightError("no block has attention", checkpoint.folder)
        arch, written = family.per_layer_arch, deci.written_shapes(written)
        hp.update(n_head=written[0].n_head, n_head_kv=written[0].n_head_kv, n_ff=max(s.n_ff for s in written))
    arch_name = gguf.MODEL_ARCH_NAMES[arch]

    def read(kind, source, block=None, transform=Transform.NONE, heads=None):
        suffix = source.rsplit(".", 1)[-1]
        return TensorPlan(gguf_name(kind, block, suffix), source, checkpoint.tensors[source].shape, kind,
                          transform, heads)

    # computed tensors first, where llama.cpp's converter puts them
    tensors = family.extra_tensors(hp, checkpoint.config) + [read(MODEL_TENSOR.TOKEN_EMBD, embed)]
    for n, stored in enumerate(block_map.stored):
        tensors += block_tensors(family, table, blocks[stored], n, shapes[n], hp, read, arch_reason is not None,
                                 checkpoint.folder, ffn_width=written[n].n_ff)
        if layout.experts:
            tensors += moe.expert_tensors(layout.experts[stored], n, gguf_name, hp["n_embd"])
    tensors.append(read(MODEL_TENSOR.OUTPUT_NORM, final_norm, transform=family.final_norm_transform))
    if family.final_norm_bias is not None:
        tensors.append(read(MODEL_TENSOR.OUTPUT_NORM, family.final_norm_bias))
    if lm_head in checkpoint.tensors:
        tensors.append(read(MODEL_TENSOR.OUTPUT, lm_head))
    check_shapes(tensors, hp, padded(shapes, pad, pad_unless), checkpoint.folder)
    check_known_to_arch(tensors, family, arch)

    tokenizer = read_model_tokenizer(checkpoint, options, vocab)
    naming = make_naming(checkpoint.folder, sum(t.n_elements for t in tensors), recipe, options.name)

    def key(k: str) -> str:
        return k.format(arch=arch_name)

    hparams = hparam_metadata(hp, key)
    if arch_reason is not None:
        hparams = deci.per_layer_metadata(hparams, written, hp, key)
    metadata = (general_metadata(naming, recipe) + hparams + family.extra_metadata(hp, checkpoint.config, key)
                + provenance_metadata(block_map, recipe) + deci.sub_block_provenance(shapes))
    if layout.experts:
        removed = moe.removed_experts(checkpoint.config, layout.experts, block_map, checkpoint.folder)
        metadata += moe.expert_provenance(hp, removed)
    return ModelPlan(source=checkpoint.folder, converter=family.name, arch=arch_name, naming=naming,
                     block_map=block_map, hparams=hp, metadata=tuple(metadata), tensors=tuple(tensors),
                     tokenizer=tokenizer, warnings=tuple(warnings) + tokenizer.warnings, block_shapes=shapes,
                     arch_reason=arch_reason)


def block_tensors(family: Family, table, present: dict[str, str], n: int, shape: BlockShape, hp: dict, read,
                  per_layer: bool, folder, ffn_width: int) -> list[TensorPlan]:
    """One block's tensors in the table's order; absent sub-blocks get deci's stand-ins when needed;
    FFN tensors planned ``ffn_width`` wide (zero-padded when wider than the source)."""
    has = {"attn": shape.n_head > 0, "mlp": shape.n_ff > 0}
    out: list[TensorPlan] = []
    for part in ("attn", "mlp"):
        if not has[part]:
            if per_layer and part == "attn" and n == 0:
                out += deci.stand_in_attention(n, hp, gguf_name)
            elif per_layer and part == "mlp":
                out += deci.stand_in_ffn(n, hp, gguf_name)
            continue      # a leftover norm of a removed sub-block is not written
        for suffix, (kind, transform) in table.items():
            if sub_block(suffix) != part:
                continue
            if suffix not in present:
                continue   # optional, or linear attention (read_layout checked the rest)
            heads = {Transform.PERMUTE_Q: shape.n_head, Transform.PERMUTE_K: shape.n_head_kv}.get(transform)
            t = read(kind, present[suffix], n, transform, heads)
            if part == "mlp" and ffn_width != shape.n_ff:
                t = replace(t, shape=ffn_shape(t, ffn_width))
            out.append(t)
    return out


def padded(shapes, pad: int, unless: int | None = None) -> tuple[BlockShape, ...]:
    """The shapes with FFN widths rounded up to a multiple of ``pad`` (0: unchanged), but for
    widths equal to ``unless`` (the unpruned width). The extra channels are zero in gate, up and
    down: SiLU(0) * 0 = 0, so the output is exactly the same, and K-quants (256 values per block)
    quantize ffn_down instead of falling back (scripts/bench_ffn_padding.py measures it)."""
    if not pad:
        return tuple(shapes)
    return tuple(s if s.n_ff == unless or s.n_expert else BlockShape(s.n_head, s.n_head_kv, -(-s.n_ff // pad) * pad)
                 for s in shapes)   # experts are never padded: llama.cpp's per-expert rows stay as stored


def ffn_shape(t: TensorPlan, width: int) -> tuple[int, ...]:
    """An FFN tensor's planned shape at ``width`` channels (down: columns; gate/up: rows)."""
    if t.kind == MODEL_TENSOR.FFN_DOWN:
        return (t.shape[0], width) if len(t.shape) > 1 else tuple(t.shape)
    if t.kind == MODEL_TENSOR.FFN_NORM:
        return tuple(t.shape)
    return (width, *t.shape[1:])


def stale_width_warnings(hp: dict, shape: BlockShape) -> list[str]:
    """Say where config.json disagrees with the (uniform) shapes the tensors hold."""
    found = {"num_attention_heads": (hp["n_head"], shape.n_head),
             "num_key_value_heads": (hp["n_head_kv"], shape.n_head_kv),
             "intermediate_size": (hp["n_ff"], shape.n_ff)}
    return [f"config says {k}={said} but the tensors hold {held}; following the tensors"
            for k, (said, held) in found.items() if said != held]


def expected_shape(kind: MODEL_TENSOR, suffix: str, hp: dict) -> tuple[int, ...] | None:
    """The shape ``config.json`` implies for a tensor (None: nothing to check)."""
    d, ff = hp["n_embd"], hp["n_ff"]
    q, kv = hp["n_head"] * hp["head_dim"], hp["n_head_kv"] * hp["head_dim"]
    if suffix == "bias":
        return {MODEL_TENSOR.ATTN_Q: (q,), MODEL_TENSOR.ATTN_K: (kv,), MODEL_TENSOR.ATTN_V: (kv,),
                MODEL_TENSOR.ATTN_OUT: (d,), MODEL_TENSOR.FFN_GATE: (ff,), MODEL_TENSOR.FFN_UP: (ff,),
                MODEL_TENSOR.FFN_DOWN: (d,)}.get(kind)
    return {
        MODEL_TENSOR.TOKEN_EMBD: (hp["vocab_size"], d), MODEL_TENSOR.OUTPUT: (hp["vocab_size"], d),
        MODEL_TENSOR.OUTPUT_NORM: (d,), MODEL_TENSOR.ATTN_NORM: (d,), MODEL_TENSOR.FFN_NORM: (d,),
        MODEL_TENSOR.ATTN_Q: (q, d), MODEL_TENSOR.ATTN_K: (kv, d), MODEL_TENSOR.ATTN_V: (kv, d),
        MODEL_TENSOR.ATTN_OUT: (d, q), MODEL_TENSOR.FFN_GATE: (ff, d), MODEL_TENSOR.FFN_UP: (ff, d),
        MODEL_TENSOR.FFN_DOWN: (d, ff), MODEL_TENSOR.ATTN_Q_NORM: (hp["head_dim"],),
        MODEL_TENSOR.ATTN_K_NORM: (hp["head_dim"],), MODEL_TENSOR.ROPE_FREQS: (hp["head_dim"] // 2,),
    }.get(kind)


def check_shapes(tensors: list[TensorPlan], hp: dict, shapes, folder) -> None:
    """Every tensor read must have the shape its block's head counts and FFN width imply."""
    for t in tensors:
        if t.computed or t.source.endswith(LINEAR_ATTN):
            continue
        parts = t.name.split(".")
        block_hp = hp
        if parts[0] == "blk":
            s = shapes[int(parts[1])]
            block_hp = {**hp, "n_head": s.n_head, "n_head_kv": s.n_head_kv, "n_ff": s.n_ff}
        expected = expected_shape(t.kind, parts[-1], block_hp)
        if expected is not None and tuple(t.shape) != expected:
            where = f"block {parts[1]}: " if parts[0] == "blk" else ""
            raise WeightError(f"{where}tensor {t.source!r} has shape {list(t.shape)} but {list(expected)} "
                              f"was expected", folder)


def check_known_to_arch(tensors: list[TensorPlan], family: Family, arch) -> None:
    """Every planned tensor must be one llama.cpp's architecture has (gguf-py's table says which)."""
    allowed = set(gguf.MODEL_TENSORS[arch])
    for t in tensors:
        if t.kind not in allowed:
            raise AssertionError(f"family {family.name} plans {t.name}, which {gguf.MODEL_ARCH_NAMES[arch]} "
                                 f"does not have")


def read_model_tokenizer(checkpoint, options, vocab: int):
    from shortquant.tokenizer import read_tokenizer

    template = options.chat_template
    if template is None and options.recipe is not None:
        template = options.recipe.chat_template
    return read_tokenizer(checkpoint.folder, chat_template=template, vocab_size=vocab,
                          pre=getattr(options, "pre", None))


def general_metadata(naming, recipe) -> list[MetaItem]:
    S, U = GGUFValueType.STRING, GGUFValueType.UINT32
    G = Keys.General
    items = [MetaItem(G.TYPE, "model", S), MetaItem(G.NAME, naming.name, S),
             MetaItem(G.BASENAME, naming.basename, S), MetaItem(G.SIZE_LABEL, naming.size_label, S)]
    if naming.finetune:
        items.append(MetaItem(G.FINETUNE, naming.finetune, S))
    if naming.version:
        items.append(MetaItem(G.VERSION, naming.version, S))
    if recipe is not None:
        if recipe.license:
            items.append(MetaItem(G.LICENSE, recipe.license, S))
        if recipe.license_name:
            items.append(MetaItem(G.LICENSE_NAME, recipe.license_name, S))
        if recipe.license_link:
            items.append(MetaItem(G.LICENSE_LINK, recipe.license_link, S))
        if recipe.base_model:
            org, _, model = recipe.base_model.rpartition("/")
            items.append(MetaItem(G.BASE_MODEL_COUNT, 1, U))
            items.append(MetaItem(G.BASE_MODEL_NAME.format(id=0), model, S))
            if org:
                items.append(MetaItem(G.BASE_MODEL_ORGANIZATION.format(id=0), org, S))
            items.append(MetaItem(G.BASE_MODEL_REPO_URL.format(id=0),
                                  f"https://huggingface.co/{recipe.base_model}", S))
        if recipe.hub_id:
            items.append(MetaItem(G.SOURCE_URL, f"https://huggingface.co/{recipe.hub_id}", S))
    items.append(MetaItem(G.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, U))
    return items


def provenance_metadata(block_map, recipe) -> list[MetaItem]:
    items = [MetaItem(keys.VERSION, __version__, GGUFValueType.STRING)]
    if block_map.original is not None:
        items.append(MetaItem(keys.SOURCE_BLOCKS, list(block_map.original), GGUFValueType.ARRAY,
                              GGUFValueType.INT32))
    if block_map.source_block_count is not None:
        items.append(MetaItem(keys.SOURCE_BLOCK_COUNT, block_map.source_block_count, GGUFValueType.UINT32))
    if recipe is not None:
        items.append(MetaItem(keys.RECIPE, recipe.name, GGUFValueType.STRING))
    method = recipe.pruning.method if recipe is not None else None
    if block_map.method:
        method = f"{method}; then {block_map.method}" if method else block_map.method
    if method:
        items.append(MetaItem(keys.PRUNING_METHOD, method, GGUFValueType.STRING))
    return items
