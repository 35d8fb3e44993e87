"""Qwen3 checkpoints -> llama.cpp's ``qwen3``: RMS norms on each head's Q and K; NEOX rope;
``head_dim`` explicit (128 where hidden/heads would give less)."""

from __future__ import annotations

from gguf import MODEL_ARCH, MODEL_TENSOR

from shortquant.plan import Transform

from .family import Family, neox_block
from .hparams import llama_style_hparams, rope_scaling_metadata

FAMILY = Family(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    arch=MODEL_ARCH.QWEN3,
    block_tensors=neox_block({
        "self_attn.q_norm.weight": (MODEL_TENSOR.ATTN_Q_NORM, Transform.NONE),
        "self_attn.k_norm.weight": (MODEL_TENSOR.ATTN_K_NORM, Transform.NONE),
    }),
    hparams=llama_style_hparams,
    extra_metadata=lambda hp, config, key: rope_scaling_metadata(config, key),
    torch_model="Qwen3ForCausalLM",
)
