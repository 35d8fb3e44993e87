"""Qwen3-MoE checkpoints (Qwen3-30B-A3B, Qwen3-Coder, their REAP expert-pruned releases) ->
llama.cpp's ``qwen3moe``: Qwen3's attention (per-head Q/K norms, NEOX rope) and a mixture of
experts in every block, stacked as llama.cpp reads them (families/moe.py)."""

from __future__ import annotations

from gguf import MODEL_ARCH, MODEL_TENSOR

from shortquant.errors import ConfigError
from shortquant.plan import Transform

from .family import Family, neox_block, without_mlp
from .hparams import llama_style_hparams, rope_scaling_metadata
from .moe import MLP_EXPERTS, expert_hparams, expert_metadata


def qwen3moe_hparams(config: dict, path) -> dict:
    """Qwen3-MoE's settings; what llama.cpp's graph cannot run is refused: it renormalises the
    chosen experts' weights (``norm_topk_prob``) and has no dense blocks between expert blocks."""
    hp = expert_hparams(config, path, ("num_experts", "num_local_experts"), "moe_intermediate_size", llama_style_hparams(config, path))
    if config.get("norm_topk_prob") is False:
        raise ConfigError("norm_topk_prob is false; llama.cpp's qwen3moe always renormalises the chosen "
                          "experts' weights", path)
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise ConfigError("mlp_only_layers / decoder_sparse_step make some blocks dense; llama.cpp's qwen3moe "
                          "has experts in every block", path)
    return hp


FAMILY = Family(
    name="qwen3moe",
    architectures=("Qwen3MoeForCausalLM",),
    model_types=("qwen3_moe",),
    arch=MODEL_ARCH.QWEN3MOE,
    block_tensors=without_mlp(neox_block({
        "self_attn.q_norm.weight": (MODEL_TENSOR.ATTN_Q_NORM, Transform.NONE),
        "self_attn.k_norm.weight": (MODEL_TENSOR.ATTN_K_NORM, Transform.NONE),
    })),
    hparams=qwen3moe_hparams,
    extra_metadata=lambda hp, config, key: (expert_metadata(hp, key, width_key=True)
                                            + rope_scaling_metadata(config, key)),
    experts=(MLP_EXPERTS,),
    torch_model="Qwen3MoeForCausalLM",
)
