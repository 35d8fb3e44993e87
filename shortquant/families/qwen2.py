"""Qwen2 / Qwen2.5 checkpoints -> llama.cpp's ``qwen2``: biases on Q, K and V; NEOX rope (no
Q/K permutation); sliding-window settings are not read by llama.cpp and are ignored."""

from __future__ import annotations

from gguf import MODEL_ARCH, MODEL_TENSOR

from shortquant.plan import Transform

from .family import Family, neox_block
from .hparams import llama_style_hparams, rope_scaling_metadata

FAMILY = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    arch=MODEL_ARCH.QWEN2,
    block_tensors=neox_block({
        "self_attn.q_proj.bias": (MODEL_TENSOR.ATTN_Q, Transform.NONE),
        "self_attn.k_proj.bias": (MODEL_TENSOR.ATTN_K, Transform.NONE),
        "self_attn.v_proj.bias": (MODEL_TENSOR.ATTN_V, Transform.NONE),
    }),
    hparams=lambda config, path: llama_style_hparams(config, path, allow_bias=True),
    extra_metadata=lambda hp, config, key: rope_scaling_metadata(config, key),
    torch_model="Qwen2ForCausalLM",
)
