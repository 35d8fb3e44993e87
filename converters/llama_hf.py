"""Hugging Face LLaMA-style checkpoints (LLaMA, Vicuna, Shortened LLaMA, Mistral-style) -> ``llama``.

Every block must have the same shapes (depth pruning keeps them); blocks may be missing or
gapped, which ``shortquant.layers`` resolves.
"""

from __future__ import annotations

import gguf
from gguf import MODEL_TENSOR, GGUFValueType, Keys

from shortquant import __version__, keys
from shortquant.errors import ConfigError, WeightError
from shortquant.layers import check_block_tensors, group_block_tensors, make_block_map
from shortquant.naming import make_naming
from shortquant.plan import MetaItem, ModelPlan, TensorPlan, Transform

NAME = "llama-hf"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
BLOCK_PREFIX = "model.layers"

# HF block tensor suffix -> (GGUF tensor kind, transform)
BLOCK_TENSORS = {
    "input_layernorm.weight": (MODEL_TENSOR.ATTN_NORM, Transform.NONE),
    "self_attn.q_proj.weight": (MODEL_TENSOR.ATTN_Q, Transform.PERMUTE_Q),
    "self_attn.k_proj.weight": (MODEL_TENSOR.ATTN_K, Transform.PERMUTE_K),
    "self_attn.v_proj.weight": (MODEL_TENSOR.ATTN_V, Transform.NONE),
    "self_attn.o_proj.weight": (MODEL_TENSOR.ATTN_OUT, Transform.NONE),
    "post_attention_layernorm.weight": (MODEL_TENSOR.FFN_NORM, Transform.NONE),
    "mlp.gate_proj.weight": (MODEL_TENSOR.FFN_GATE, Transform.NONE),
    "mlp.up_proj.weight": (MODEL_TENSOR.FFN_UP, Transform.NONE),
    "mlp.down_proj.weight": (MODEL_TENSOR.FFN_DOWN, Transform.NONE),
}
IGNORED_BLOCK_TENSORS = ("self_attn.rotary_emb.inv_freq",)
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def recognises(checkpoint) -> bool:
    archs = checkpoint.config.get("architectures") or []
    return any(a in SUPPORTED_ARCHITECTURES for a in archs) or \
        (not archs and checkpoint.config.get("model_type") in ("llama", "mistral"))


def gguf_name(kind: MODEL_TENSOR, block: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=block) if block is not None else base) + ".weight"


def make_plan(checkpoint, options) -> ModelPlan:
    """Plan the ``llama`` GGUF for an HF LLaMA-style checkpoint (no weights read)."""
    config_path = checkpoint.folder / "config.json"
    hp = _hparams(checkpoint.config, config_path)

    blocks, others = group_block_tensors(checkpoint.tensors, BLOCK_PREFIX)
    check_block_tensors(blocks, list(BLOCK_TENSORS), IGNORED_BLOCK_TENSORS)
    recipe = options.recipe
    block_map = make_block_map(
        list(blocks), checkpoint.config.get("num_hidden_layers"),
        source_blocks=options.source_blocks,
        recipe_kept=recipe.kept_blocks if recipe else None,
        recipe_source_count=recipe.pruning.source_block_count if recipe else None,
        recipe_name=recipe.name if recipe else None)

    missing = [n for n in (EMBED, FINAL_NORM) if n not in checkpoint.tensors]
    if missing:
        raise WeightError(f"missing tensor {missing[0]!r}", checkpoint.folder)
    unexpected = [n for n in others if n not in (EMBED, FINAL_NORM, LM_HEAD)]
    if unexpected:
        raise WeightError(f"unexpected tensor {unexpected[0]!r} for a LLaMA checkpoint", checkpoint.folder)

    vocab = checkpoint.tensors[EMBED].shape[0]
    hp["vocab_size"] = vocab
    if checkpoint.config.get("vocab_size") not in (None, vocab):
        raise WeightError(f"{EMBED} has {vocab} rows but config.json says vocab_size="
                          f"{checkpoint.config['vocab_size']}", checkpoint.folder)

    tensors = [TensorPlan(gguf_name(MODEL_TENSOR.TOKEN_EMBD), EMBED, checkpoint.tensors[EMBED].shape,
                          MODEL_TENSOR.TOKEN_EMBD)]
    for n, stored in enumerate(block_map.stored):
        for suffix, (kind, transform) in BLOCK_TENSORS.items():
            source = blocks[stored][suffix]
            heads = {Transform.PERMUTE_Q: hp["n_head"], Transform.PERMUTE_K: hp["n_head_kv"]}.get(transform)
            tensors.append(TensorPlan(gguf_name(kind, n), source, checkpoint.tensors[source].shape,
                                      kind, transform, heads))
    tensors.append(TensorPlan(gguf_name(MODEL_TENSOR.OUTPUT_NORM), FINAL_NORM,
                              checkpoint.tensors[FINAL_NORM].shape, MODEL_TENSOR.OUTPUT_NORM))
    if LM_HEAD in checkpoint.tensors:
        tensors.append(TensorPlan(gguf_name(MODEL_TENSOR.OUTPUT), LM_HEAD, checkpoint.tensors[LM_HEAD].shape,
                                  MODEL_TENSOR.OUTPUT))
    elif not checkpoint.config.get("tie_word_embeddings", False):
        raise WeightError(f"missing tensor {LM_HEAD!r} (and tie_word_embeddings is false)", checkpoint.folder)
    _check_shapes(tensors, hp, checkpoint.folder)

    hp["n_layer"] = block_map.block_count
    tokenizer = _read_tokenizer(checkpoint, options, vocab)
    naming = make_naming(checkpoint.folder, sum(t.n_elements for t in tensors), recipe, options.name)
    metadata = (_general_metadata(naming, recipe) + _llama_metadata(hp, checkpoint.config)
                + _provenance_metadata(block_map, recipe))
    return ModelPlan(source=checkpoint.folder, converter=NAME, arch=ARCH, naming=naming, block_map=block_map,
                     hparams=hp, metadata=tuple(metadata), tensors=tuple(tensors), tokenizer=tokenizer,
                     warnings=block_map.warnings + tokenizer.warnings)


def _hparams(config: dict, path) -> dict:
    def need(key):
        value = config.get(key)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"missing or invalid {key!r}", path)
        return value

    hidden, n_head = need("hidden_size"), need("num_attention_heads")
    n_head_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or hidden // n_head
    if n_head % n_head_kv:
        raise ConfigError(f"num_attention_heads={n_head} is not a multiple of num_key_value_heads={n_head_kv}",
                          path)
    if head_dim % 2:
        raise ConfigError(f"head_dim={head_dim} must be even for rotary embeddings", path)
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConfigError("attention_bias / mlp_bias are not supported by the llama converter", path)
    return {
        "n_embd": hidden, "n_ff": need("intermediate_size"), "n_head": n_head, "n_head_kv": n_head_kv,
        "head_dim": head_dim, "n_ctx": config.get("max_position_embeddings") or 2048,
        "rms_eps": float(config.get("rms_norm_eps", 1e-6)), "rope_theta": float(config.get("rope_theta", 10000.0)),
    }


def _check_shapes(tensors: list[TensorPlan], hp: dict, folder) -> None:
    d, ff, q, kv = hp["n_embd"], hp["n_ff"], hp["n_head"] * hp["head_dim"], hp["n_head_kv"] * hp["head_dim"]
    expected = {
        MODEL_TENSOR.TOKEN_EMBD: (hp["vocab_size"], d), MODEL_TENSOR.OUTPUT: (hp["vocab_size"], d),
        MODEL_TENSOR.OUTPUT_NORM: (d,), MODEL_TENSOR.ATTN_NORM: (d,), MODEL_TENSOR.FFN_NORM: (d,),
        MODEL_TENSOR.ATTN_Q: (q, d), MODEL_TENSOR.ATTN_K: (kv, d), MODEL_TENSOR.ATTN_V: (kv, d),
        MODEL_TENSOR.ATTN_OUT: (d, q), MODEL_TENSOR.FFN_GATE: (ff, d), MODEL_TENSOR.FFN_UP: (ff, d),
        MODEL_TENSOR.FFN_DOWN: (d, ff),
    }
    for t in tensors:
        if tuple(t.shape) != expected[t.kind]:
            raise WeightError(f"tensor {t.source!r} has shape {list(t.shape)} but config.json implies "
                              f"{list(expected[t.kind])} (non-uniform widths are not supported by the llama "
                              f"converter)", folder)


def _read_tokenizer(checkpoint, options, vocab: int):
    from shortquant.tokenizer import read_tokenizer

    template = options.chat_template
    if template is None and options.recipe is not None:
        template = options.recipe.chat_template
    return read_tokenizer(checkpoint.folder, chat_template=template, vocab_size=vocab)


def _general_metadata(naming, recipe) -> list[MetaItem]:
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


def _llama_metadata(hp: dict, config: dict) -> list[MetaItem]:
    U, F, S = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    L = Keys.LLM
    A, R = Keys.Attention, Keys.Rope

    def k(key: str) -> str:
        return key.format(arch=ARCH)

    items = [
        MetaItem(k(L.CONTEXT_LENGTH), hp["n_ctx"], U),
        MetaItem(k(L.EMBEDDING_LENGTH), hp["n_embd"], U),
        MetaItem(k(L.BLOCK_COUNT), hp["n_layer"], U),
        MetaItem(k(L.FEED_FORWARD_LENGTH), hp["n_ff"], U),
        MetaItem(k(R.DIMENSION_COUNT), hp["head_dim"], U),
        MetaItem(k(A.HEAD_COUNT), hp["n_head"], U),
        MetaItem(k(A.HEAD_COUNT_KV), hp["n_head_kv"], U),
        MetaItem(k(A.LAYERNORM_RMS_EPS), hp["rms_eps"], F),
        MetaItem(k(R.FREQ_BASE), hp["rope_theta"], F),
        MetaItem(k(L.VOCAB_SIZE), hp["vocab_size"], U),
    ]
    if hp["head_dim"] != hp["n_embd"] // hp["n_head"]:
        items += [MetaItem(k(A.KEY_LENGTH), hp["head_dim"], U), MetaItem(k(A.VALUE_LENGTH), hp["head_dim"], U)]
    items += _rope_scaling(config.get("rope_scaling"), k)
    return items


def _rope_scaling(scaling, k) -> list[MetaItem]:
    if not scaling:
        return []
    R = Keys.Rope
    kind = scaling.get("rope_type") or scaling.get("type")
    factor = scaling.get("factor")
    F, S, U = GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.UINT32
    if kind == "default":
        return []
    if kind == "linear" and factor:
        return [MetaItem(k(R.SCALING_TYPE), "linear", S), MetaItem(k(R.SCALING_FACTOR), float(factor), F)]
    if kind == "yarn" and factor:
        items = [MetaItem(k(R.SCALING_TYPE), "yarn", S), MetaItem(k(R.SCALING_FACTOR), float(factor), F)]
        if scaling.get("original_max_position_embeddings"):
            items.append(MetaItem(k(R.SCALING_ORIG_CTX_LEN), int(scaling["original_max_position_embeddings"]), U))
        return items
    raise ConfigError(f"rope_scaling type {kind!r} is not supported yet (supported: linear, yarn)")


def _provenance_metadata(block_map, recipe) -> list[MetaItem]:
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
