"""Mixtral checkpoints (and their expert-pruned versions) -> llama.cpp's ``llama`` with experts:
LLaMA attention (Q/K permuted for interleaved rope), a mixture of experts in every block, stored
as published (``block_sparse_moe.experts.E.w1/w2/w3``) or as transformers 5 saves it
(``mlp.experts.gate_up_proj``)."""

from __future__ import annotations

from gguf import MODEL_ARCH

from .family import LLAMA_BLOCK, Family, without_mlp
from .hparams import llama_style_hparams, rope_scaling_metadata
from .moe import MIXTRAL_EXPERTS, MLP_EXPERTS, expert_hparams, expert_metadata

FAMILY = Family(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    model_types=("mixtral",),
    arch=MODEL_ARCH.LLAMA,
    block_tensors=without_mlp(LLAMA_BLOCK),
    hparams=lambda config, path: expert_hparams(config, path, ("num_local_experts", "num_experts"), "intermediate_size",
                                                llama_style_hparams(config, path)),
    extra_metadata=lambda hp, config, key: (expert_metadata(hp, key, width_key=False)
                                            + rope_scaling_metadata(config, key)),
    experts=(MIXTRAL_EXPERTS, MLP_EXPERTS),
    torch_model="MixtralForCausalLM",
)
