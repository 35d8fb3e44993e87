"""What a source family declares: the one interface every family module fills in.

A family is data plus two small functions: its Hugging Face architectures, the llama.cpp
architecture it becomes, the block tensors it has (HF suffix -> GGUF tensor and transform), and
its hyper-parameters. Everything families share (block discovery, the block map, shape checks,
naming, general metadata, provenance, the tokenizer) is done once by ``planner.plan_model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
from gguf import MODEL_TENSOR

from shortquant.plan import MetaItem, TensorPlan, Transform

# HF block tensor suffix -> (GGUF tensor kind, transform)
BlockTable = dict[str, tuple[MODEL_TENSOR, Transform]]

# The LLaMA block every family starts from; Q/K permuted for llama.cpp's interleaved rope.
LLAMA_BLOCK: BlockTable = {
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


# Biases llama.cpp's llama and deci read when present (FLAP adds the o_proj and down_proj ones).
LLAMA_OPTIONAL_BIASES: BlockTable = {
    "self_attn.o_proj.bias": (MODEL_TENSOR.ATTN_OUT, Transform.NONE),
    "mlp.gate_proj.bias": (MODEL_TENSOR.FFN_GATE, Transform.NONE),
    "mlp.up_proj.bias": (MODEL_TENSOR.FFN_UP, Transform.NONE),
    "mlp.down_proj.bias": (MODEL_TENSOR.FFN_DOWN, Transform.NONE),
}


def neox_block(extra: BlockTable | None = None) -> BlockTable:
    """The LLaMA block without the Q/K permutation (families whose llama.cpp graph uses NEOX
    rope, which rotates halves as Hugging Face does), plus ``extra`` tensors."""
    table = {suffix: (kind, Transform.NONE) for suffix, (kind, _) in LLAMA_BLOCK.items()}
    table.update(extra or {})
    return table


def without_mlp(table: BlockTable) -> BlockTable:
    """A block table without the dense MLP's projections (mixture-of-experts blocks)."""
    return {s: v for s, v in table.items() if not s.startswith("mlp.")}


@dataclass(frozen=True)
class Family:
    """A source family. ``hparams(config, path)`` returns the model's hyper-parameters (shared
    keys: n_embd, n_ff, n_head, n_head_kv, head_dim, n_ctx, rms_eps, rope_theta);
    ``extra_tensors(hp, config)`` returns tensors computed from the config (not read from the
    checkpoint), e.g. Llama-3's rope frequency factors; ``extra_metadata(hp, config, key)`` the
    architecture's own keys beyond the shared ones (``key`` formats a key for the arch)."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    arch: gguf.MODEL_ARCH
    block_tensors: BlockTable
    hparams: Callable[[dict, Path], dict]
    ignored_block_tensors: tuple[str, ...] = ("self_attn.rotary_emb.inv_freq",)
    extra_tensors: Callable[[dict, dict], list[TensorPlan]] = field(default=lambda hp, config: [])
    extra_metadata: Callable[[dict, dict, Callable[[str], str]], list[MetaItem]] = \
        field(default=lambda hp, config, key: [])
    # block tensors written when present (e.g. FLAP's o_proj / down_proj biases)
    optional_block_tensors: BlockTable = field(default_factory=dict)
    # the llama.cpp architecture with per-layer shapes (deci), or None: blocks must all be alike
    per_layer_arch: gguf.MODEL_ARCH | None = None
    # check_block_shapes(config, hp, shapes, stored, folder): the config's own account of the shapes
    check_block_shapes: Callable | None = None
    # the transformers class that runs the checkpoint (hf_model.py sets each block's own shapes on it)
    torch_model: str = "LlamaForCausalLM"
    # mixture of experts: the layouts its router and experts may be stored in (families/moe.py)
    experts: tuple = ()
    block_prefix: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    final_norm_bias: str | None = None         # LayerNorm families (Nemotron)
    final_norm_transform: Transform = Transform.NONE
    lm_head: str = "lm_head.weight"

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def recognises(self, config: dict) -> bool:
        archs = config.get("architectures") or []
        if archs:
            return any(a in self.architectures for a in archs)
        return config.get("model_type") in self.model_types
