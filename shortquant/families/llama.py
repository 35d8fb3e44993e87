"""LLaMA-style checkpoints -> llama.cpp's ``llama``: LLaMA 1/2, Vicuna, Shortened LLaMA,
Llama-3.x (``llama3`` rope scaling as the ``rope_freqs`` tensor), Mistral v0.1-v0.3, SmolLM,
Minitron (explicit ``head_dim``); transformers' ``per_layer_config`` checked against the tensors."""

from __future__ import annotations

from gguf import MODEL_ARCH

from .family import LLAMA_BLOCK, LLAMA_OPTIONAL_BIASES, Family
from .hparams import llama3_rope_factors, llama_style_hparams, rope_scaling_metadata
from .shapes import check_per_layer_config

FAMILY = Family(
    name="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    model_types=("llama", "mistral"),
    arch=MODEL_ARCH.LLAMA,
    block_tensors=LLAMA_BLOCK,
    hparams=llama_style_hparams,
    extra_tensors=llama3_rope_factors,
    extra_metadata=lambda hp, config, key: rope_scaling_metadata(config, key, ("linear", "yarn", "llama3")),
    optional_block_tensors=LLAMA_OPTIONAL_BIASES,
    per_layer_arch=MODEL_ARCH.DECI,   # width-pruned / sub-block-dropped LLaMA (families/deci.py)
    check_block_shapes=check_per_layer_config,   # transformers' per_layer_config, when present
)
