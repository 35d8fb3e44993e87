"""The shared planner: one function turns any family's checkpoint into a ``ModelPlan``.

Block discovery and the block map, the tensor list with its shape checks, naming, general
metadata, provenance and the tokenizer are the same for every family; the family supplies its
tensor table, hyper-parameters and quirks (``family.Family``).
"""

from __future__ import annotations

import gguf
from gguf import MODEL_TENSOR, GGUFValueType, Keys

from shortquant import __version__, keys
from shortquant.errors import WeightError
from shortquant.layers import check_block_tensors, group_block_tensors, make_block_map
from shortquant.naming import make_naming
from shortquant.plan import MetaItem, ModelPlan, TensorPlan, Transform

from .family import Family
from .hparams import hparam_metadata


def gguf_name(kind: MODEL_TENSOR, block: int | None = None, suffix: str = "weight") -> str:
    """``blk.3.attn_q.weight`` for (ATTN_Q, 3); the names are gguf-py's."""
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=block) if block is not None else base) + "." + suffix


def plan_model(family: Family, checkpoint, options) -> ModelPlan:
    """Plan the GGUF for ``checkpoint`` as ``family`` (no weights read)."""
    config_path = checkpoint.folder / "config.json"
    hp = family.hparams(checkpoint.config, config_path)

    blocks, others = group_block_tensors(checkpoint.tensors, family.block_prefix)
    check_block_tensors(blocks, list(family.block_tensors), family.ignored_block_tensors)
    recipe = options.recipe
    block_map = make_block_map(
        list(blocks), checkpoint.config.get("num_hidden_layers"),
        source_blocks=options.source_blocks,
        recipe_kept=recipe.kept_blocks if recipe else None,
        recipe_source_count=recipe.pruning.source_block_count if recipe else None,
        recipe_name=recipe.name if recipe else None)

    embed, final_norm, lm_head = family.embed, family.final_norm, family.lm_head
    missing = [n for n in (embed, final_norm) if n not in checkpoint.tensors]
    if missing:
        raise WeightError(f"missing tensor {missing[0]!r}", checkpoint.folder)
    unexpected = [n for n in others if n not in (embed, final_norm, lm_head)]
    if unexpected:
        raise WeightError(f"unexpected tensor {unexpected[0]!r} for a {family.name} checkpoint", checkpoint.folder)

    vocab = checkpoint.tensors[embed].shape[0]
    hp["vocab_size"] = vocab
    if checkpoint.config.get("vocab_size") not in (None, vocab):
        raise WeightError(f"{embed} has {vocab} rows but config.json says vocab_size="
                          f"{checkpoint.config['vocab_size']}", checkpoint.folder)
    hp["n_layer"] = block_map.block_count

    def read(kind, source, block=None, transform=Transform.NONE, heads=None):
        suffix = source.rsplit(".", 1)[-1]
        return TensorPlan(gguf_name(kind, block, suffix), source, checkpoint.tensors[source].shape, kind,
                          transform, heads)

    # computed tensors first, where llama.cpp's converter puts them
    tensors = family.extra_tensors(hp, checkpoint.config) + [read(MODEL_TENSOR.TOKEN_EMBD, embed)]
    for n, stored in enumerate(block_map.stored):
        for suffix, (kind, transform) in family.block_tensors.items():
            heads = {Transform.PERMUTE_Q: hp["n_head"], Transform.PERMUTE_K: hp["n_head_kv"]}.get(transform)
            tensors.append(read(kind, blocks[stored][suffix], n, transform, heads))
    tensors.append(read(MODEL_TENSOR.OUTPUT_NORM, final_norm))
    if lm_head in checkpoint.tensors:
        tensors.append(read(MODEL_TENSOR.OUTPUT, lm_head))
    elif not checkpoint.config.get("tie_word_embeddings", False):
        raise WeightError(f"missing tensor {lm_head!r} (and tie_word_embeddings is false)", checkpoint.folder)
    check_shapes(tensors, hp, checkpoint.folder)
    check_known_to_arch(tensors, family)

    tokenizer = read_model_tokenizer(checkpoint, options, vocab)
    naming = make_naming(checkpoint.folder, sum(t.n_elements for t in tensors), recipe, options.name)

    def key(k: str) -> str:
        return k.format(arch=family.arch_name)

    metadata = (general_metadata(naming, recipe) + hparam_metadata(hp, key)
                + family.extra_metadata(hp, checkpoint.config, key) + provenance_metadata(block_map, recipe))
    return ModelPlan(source=checkpoint.folder, converter=family.name, arch=family.arch_name, naming=naming,
                     block_map=block_map, hparams=hp, metadata=tuple(metadata), tensors=tuple(tensors),
                     tokenizer=tokenizer, warnings=block_map.warnings + tokenizer.warnings)


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


def check_shapes(tensors: list[TensorPlan], hp: dict, folder) -> None:
    for t in tensors:
        expected = expected_shape(t.kind, t.name.rsplit(".", 1)[-1], hp)
        if expected is not None and tuple(t.shape) != expected:
            raise WeightError(f"tensor {t.source!r} has shape {list(t.shape)} but config.json implies "
                              f"{list(expected)} (non-uniform widths are not supported yet)", folder)


def check_known_to_arch(tensors: list[TensorPlan], family: Family) -> None:
    """Every planned tensor must be one llama.cpp's architecture has (gguf-py's table says which)."""
    allowed = set(gguf.MODEL_TENSORS[family.arch])
    for t in tensors:
        if t.kind not in allowed:
            raise AssertionError(f"family {family.name} plans {t.name}, which {family.arch_name} does not have")


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
        items.append(MetaItem(keys.PRUNING_METHOD, recipe.pruning.method, GGUFValueType.STRING))
    return items
