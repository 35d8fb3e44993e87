"""Hyper-parameters from ``config.json`` and the metadata keys llama.cpp reads for them.

The LLaMA-style keys (hidden_size, num_attention_heads, ...) are shared by every family we
convert; each family adds or forbids a few (``hparams`` below takes those as arguments).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from gguf import MODEL_TENSOR, GGUFValueType, Keys

from shortquant.errors import ConfigError
from shortquant.plan import MetaItem, TensorPlan


def llama_style_hparams(config: dict, path, *, allow_bias: bool = False) -> dict:
    """The shared hyper-parameters, checked. ``allow_bias``: the family has attention biases."""
    def need(key):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"missing or invalid {key!r}", path)
        return value

    hidden, n_head = need("hidden_size"), need("num_attention_heads")
    n_head_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or hidden // n_head
    if n_head % n_head_kv:
        raise ConfigError(f"num_attention_heads={n_head} is not a multiple of num_key_value_heads={n_head_kv}",
                          path)
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
        raise ConfigError(f"head_dim is {head_dim!r} (from head_dim, or hidden_size / num_attention_heads); "
                          f"it must be a positive integer", path)
    if head_dim % 2:
        raise ConfigError(f"head_dim={head_dim} must be even for rotary embeddings", path)
    if not allow_bias and (config.get("attention_bias") or config.get("mlp_bias")):
        raise ConfigError("attention_bias / mlp_bias are not supported for this architecture", path)
    return {
        "n_embd": hidden, "n_ff": need("intermediate_size"), "n_head": n_head, "n_head_kv": n_head_kv,
        "head_dim": head_dim, "n_ctx": config.get("max_position_embeddings") or 2048,
        "rms_eps": float(config.get("rms_norm_eps", 1e-6)), "rope_theta": rope_theta(config),
    }


def rope_settings(config: dict) -> dict:
    """The rope settings: ``rope_scaling`` (most hub checkpoints, transformers < 5), else
    ``rope_parameters`` (transformers >= 5, ``rope_theta`` inside); where both are present,
    ``rope_scaling`` replaces the other, as transformers does when it loads the config."""
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be an object, not {type(value).__name__}")
        return value
    return {}


def rope_theta(config: dict) -> float:
    theta = config.get("rope_theta", rope_settings(config).get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"invalid rope_theta {theta!r}")
    return float(theta)


def hparam_metadata(hp: dict, key: Callable[[str], str]) -> list[MetaItem]:
    """The keys every LLaMA-style llama.cpp architecture reads (``key`` formats them for the arch)."""
    U, F = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
    items = [
        MetaItem(key(L.CONTEXT_LENGTH), hp["n_ctx"], U),
        MetaItem(key(L.EMBEDDING_LENGTH), hp["n_embd"], U),
        MetaItem(key(L.BLOCK_COUNT), hp["n_layer"], U),
        MetaItem(key(L.FEED_FORWARD_LENGTH), hp["n_ff"], U),
        MetaItem(key(R.DIMENSION_COUNT), hp.get("n_rot", hp["head_dim"]), U),   # n_rot: partial rotary
        MetaItem(key(A.HEAD_COUNT), hp["n_head"], U),
        MetaItem(key(A.HEAD_COUNT_KV), hp["n_head_kv"], U),
        # norm_eps: the family uses LayerNorm (with bias), not RMSNorm
        MetaItem(key(A.LAYERNORM_EPS), hp["norm_eps"], F) if "norm_eps" in hp
        else MetaItem(key(A.LAYERNORM_RMS_EPS), hp["rms_eps"], F),
        MetaItem(key(R.FREQ_BASE), hp["rope_theta"], F),
        MetaItem(key(L.VOCAB_SIZE), hp["vocab_size"], U),
    ]
    if hp["head_dim"] != hp["n_embd"] // hp["n_head"]:
        items += [MetaItem(key(A.KEY_LENGTH), hp["head_dim"], U), MetaItem(key(A.VALUE_LENGTH), hp["head_dim"], U)]
    return items


def rope_kind(config: dict) -> str | None:
    scaling = rope_settings(config)
    kind = scaling.get("rope_type") or scaling.get("type")
    return None if kind in (None, "default") else kind


def rope_scaling_metadata(config: dict, key: Callable[[str], str], supported=("linear", "yarn")) -> list[MetaItem]:
    """``rope_scaling`` as llama.cpp's keys. ``llama3`` is not a key: see ``llama3_rope_factors``."""
    kind = rope_kind(config)
    if kind is None or kind == "llama3" and "llama3" in supported:
        return []
    scaling = rope_settings(config)
    factor = scaling.get("factor")
    R = Keys.Rope
    F, S, U = GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.UINT32
    if kind not in supported or not factor:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported yet (supported: {', '.join(supported)})")
    items = [MetaItem(key(R.SCALING_TYPE), kind, S), MetaItem(key(R.SCALING_FACTOR), float(factor), F)]
    if kind == "yarn" and scaling.get("original_max_position_embeddings"):
        items.append(MetaItem(key(R.SCALING_ORIG_CTX_LEN), int(scaling["original_max_position_embeddings"]), U))
    return items


def llama3_rope_factors(hp: dict, config: dict) -> list[TensorPlan]:
    """Llama-3.1's frequency-dependent rope scaling, as the ``rope_freqs.weight`` tensor llama.cpp
    reads: one divisor per rotary pair (1 for high frequencies, ``factor`` for low ones, a smooth
    blend between), computed as transformers' ``_compute_llama3_parameters`` scales inv_freq."""
    if rope_kind(config) != "llama3":
        return []
    scaling = rope_settings(config)
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    dim = hp["head_dim"]
    # float32 throughout, as llama.cpp's converter computes it with torch
    f32 = np.float32
    inv_freq = f32(1.0) / (f32(hp["rope_theta"]) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim)))
    factor, low, high, old_ctx = f32(factor), f32(low), f32(high), f32(old_ctx)
    factors = []
    for freq in inv_freq:
        wavelen = f32(2 * math.pi) / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(f32(1.0) / ((f32(1) - smooth) / factor + smooth))
    name = "rope_freqs.weight"
    return [TensorPlan(name, "(computed from rope_scaling: llama3)", (len(factors),), MODEL_TENSOR.ROPE_FREQS,
                       values=tuple(float(f32(f)) for f in factors))]
