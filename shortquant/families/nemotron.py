"""Nemotron / NVIDIA Minitron checkpoints (``NemotronForCausalLM``) -> llama.cpp's ``nemotron``.

What differs from LLaMA: LayerNorm with a bias, its weight stored minus one ("layernorm1p":
transformers adds 1 when it runs, llama.cpp multiplies by the stored weight, so 1 is added on
the way out); an MLP of up and down projections with squared ReLU and no gate; NEOX rotary
embedding on the first ``head_dim * partial_rotary_factor`` dimensions of each head only.

llama.cpp's ``nemotron`` sizes Q and the attention output as ``hidden_size`` square, so a model
whose ``heads * head_dim`` is not ``hidden_size`` (Minitron-8B: 48 x 128 = 6144 != 4096) cannot
be loaded by it: refused with that reason rather than written as a file that fails to load.
"""

from __future__ import annotations

from gguf import MODEL_ARCH, MODEL_TENSOR

from shortquant.errors import ConfigError
from shortquant.plan import Transform

from .family import Family
from .hparams import llama_style_hparams, rope_settings

N, ONE = Transform.NONE, Transform.ADD_ONE

BLOCK = {
    "input_layernorm.weight": (MODEL_TENSOR.ATTN_NORM, ONE),
    "input_layernorm.bias": (MODEL_TENSOR.ATTN_NORM, N),
    "self_attn.q_proj.weight": (MODEL_TENSOR.ATTN_Q, N),   # NEOX rope: halves as transformers rotates them
    "self_attn.k_proj.weight": (MODEL_TENSOR.ATTN_K, N),
    "self_attn.v_proj.weight": (MODEL_TENSOR.ATTN_V, N),
    "self_attn.o_proj.weight": (MODEL_TENSOR.ATTN_OUT, N),
    "post_attention_layernorm.weight": (MODEL_TENSOR.FFN_NORM, ONE),
    "post_attention_layernorm.bias": (MODEL_TENSOR.FFN_NORM, N),
    "mlp.up_proj.weight": (MODEL_TENSOR.FFN_UP, N),
    "mlp.down_proj.weight": (MODEL_TENSOR.FFN_DOWN, N),
}
BIASES = {   # attention_bias / mlp_bias
    "self_attn.q_proj.bias": (MODEL_TENSOR.ATTN_Q, N),
    "self_attn.k_proj.bias": (MODEL_TENSOR.ATTN_K, N),
    "self_attn.v_proj.bias": (MODEL_TENSOR.ATTN_V, N),
    "self_attn.o_proj.bias": (MODEL_TENSOR.ATTN_OUT, N),
    "mlp.up_proj.bias": (MODEL_TENSOR.FFN_UP, N),
    "mlp.down_proj.bias": (MODEL_TENSOR.FFN_DOWN, N),
}


def nemotron_hparams(config: dict, path) -> dict:
    """The shared settings plus LayerNorm's eps and the rotary dimension count, which comes from
    ``head_dim`` (not hidden / heads, as llama.cpp's converter computes it)."""
    hp = llama_style_hparams({"rms_norm_eps": 1e-5, **config}, path, allow_bias=True)
    if config.get("hidden_act", "relu2") != "relu2":
        raise ConfigError(f"hidden_act {config['hidden_act']!r}: llama.cpp's nemotron runs relu2 only", path)
    if hp["n_head"] * hp["head_dim"] != hp["n_embd"]:
        raise ConfigError(f"{hp['n_head']} heads of head_dim {hp['head_dim']} make {hp['n_head'] * hp['head_dim']} "
                          f"query rows, not hidden_size {hp['n_embd']}; llama.cpp's nemotron sizes the query as "
                          f"hidden_size and cannot load such a model", path)
    factor = config.get("partial_rotary_factor", rope_settings(config).get("partial_rotary_factor", 0.5))
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 1:
        raise ConfigError(f"invalid partial_rotary_factor {factor!r}", path)
    n_rot = int(hp["head_dim"] * factor)
    if n_rot % 2:
        raise ConfigError(f"head_dim * partial_rotary_factor = {n_rot} must be even", path)
    if rope_settings(config).get("rope_type", "default") not in ("default", None):
        raise ConfigError("rope scaling is not supported for nemotron", path)
    norm_eps = config.get("norm_eps", 1e-5)
    hp.pop("rms_eps")
    return {**hp, "n_rot": n_rot, "norm_eps": float(norm_eps)}


FAMILY = Family(
    name="nemotron",
    architectures=("NemotronForCausalLM",),
    model_types=("nemotron",),
    arch=MODEL_ARCH.NEMOTRON,
    block_tensors=BLOCK,
    optional_block_tensors=BIASES,
    hparams=nemotron_hparams,
    final_norm_bias="model.norm.bias",
    final_norm_transform=ONE,
    torch_model="NemotronForCausalLM",
)
