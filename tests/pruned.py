"""Tiny width-pruned and sub-block-dropped LLaMA models, as pruning tools leave them.

A random ``LlamaForCausalLM`` whose blocks are then changed module by module: attention heads and
FFN channels sliced away (LLM-Pruner / FLAP keep a subset of heads and channels; the modules carry
the new shapes while ``config.json`` keeps the original ones), whole attention / MLP modules
replaced by ones that add nothing and hold no weights (LLM-Drop), FLAP's output biases, and
DeciLM's linear attention. transformers' own forward of the result is the reference.
"""

from __future__ import annotations

import json
import shutil

import torch
from torch import nn

from conftest import DEMO_TOKENIZER
from families import build_family_model

D, HEADS, KV, FFN = 256, 4, 2, 512   # head_dim 64
HEAD_DIM = D // HEADS


class NoAttention(nn.Module):
    """A dropped attention: contributes nothing, has no weights."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class NoMLP(nn.Module):
    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


class LinearAttention(nn.Module):
    """DeciLM's ``replace_with_linear`` attention: one d x d projection of the normed input."""

    def __init__(self, d: int):
        super().__init__()
        self.linear_attn = nn.Linear(d, d, bias=False)

    def forward(self, hidden_states, *args, **kwargs):
        return self.linear_attn(hidden_states), None


def _linear(weight, bias=None):
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def keep_heads(attn, q_heads: list[int], kv_heads: list[int]) -> None:
    """Keep these query and KV heads (each query head's group must be kept)."""
    group = HEADS // KV
    assert all(h // group in kv_heads for h in q_heads)
    # the kept query heads must be grouped in order over the kept KV heads (repeat_kv semantics)
    new_group = len(q_heads) // len(kv_heads)
    assert [kv_heads.index(h // group) for h in q_heads] == [i // new_group for i in range(len(q_heads))]

    def rows(w, heads):
        return torch.cat([w[h * HEAD_DIM:(h + 1) * HEAD_DIM] for h in heads])

    attn.q_proj = _linear(rows(attn.q_proj.weight, q_heads))
    attn.k_proj = _linear(rows(attn.k_proj.weight, kv_heads))
    attn.v_proj = _linear(rows(attn.v_proj.weight, kv_heads))
    attn.o_proj = _linear(rows(attn.o_proj.weight.T, q_heads).T.contiguous())
    attn.num_key_value_groups = new_group


def keep_channels(mlp, width: int, seed: int) -> None:
    keep = torch.randperm(FFN, generator=torch.Generator().manual_seed(seed))[:width].sort().values
    mlp.gate_proj = _linear(mlp.gate_proj.weight[keep])
    mlp.up_proj = _linear(mlp.up_proj.weight[keep])
    mlp.down_proj = _linear(mlp.down_proj.weight[:, keep])


def add_flap_biases(layer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    attn, mlp = layer.self_attn, layer.mlp
    attn.o_proj = _linear(attn.o_proj.weight, torch.randn(D, generator=g) * 0.1)
    mlp.down_proj = _linear(mlp.down_proj.weight, torch.randn(D, generator=g) * 0.1)


def drop_attention(layer) -> None:
    layer.self_attn, layer.input_layernorm = NoAttention(), nn.Identity()


def drop_mlp(layer) -> None:
    layer.mlp, layer.post_attention_layernorm = NoMLP(), nn.Identity()


def linear_attention(layer, seed: int) -> None:
    layer.self_attn = LinearAttention(D)
    with torch.no_grad():
        layer.self_attn.linear_attn.weight.copy_(
            torch.randn(D, D, generator=torch.Generator().manual_seed(seed)) * 0.05)


def base_model(layers: int, seed: int = 0):
    return build_family_model("llama", 512, layers=layers, seed=seed, hidden_size=D, intermediate_size=FFN,
                              num_attention_heads=HEADS, num_key_value_heads=KV, attn_implementation="eager")


def save(model, folder, **config_changes):
    """``save_pretrained`` (the stale config as the tools leave it) plus a sentencepiece tokenizer."""
    model.save_pretrained(folder)
    shutil.copy(DEMO_TOKENIZER, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "LlamaTokenizer"}))
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        for k, v in config_changes.items():
            if v is None:
                config.pop(k, None)
            else:
                config[k] = v
        (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


# --- the layouts of the issue ---------------------------------------------------------------------

def llm_pruner(folder):
    """Per-block FFN widths (none a multiple of 256 but one) and removed GQA groups."""
    model = base_model(4)
    heads = [([0, 1, 2, 3], [0, 1]), ([2, 3], [1]), ([0, 1, 2, 3], [0, 1]), ([0, 2], [0, 1])]
    for layer, (q, kv), width, seed in zip(model.model.layers, heads, [512, 384, 320, 448], range(4)):
        keep_heads(layer.self_attn, q, kv)
        keep_channels(layer.mlp, width, seed)
    return model, save(model, folder)


def flap(folder):
    """FLAP: per-block widths and heads, biases on o_proj and down_proj."""
    model = base_model(4, seed=1)
    heads = [([0, 1, 2, 3], [0, 1]), ([0, 1], [0]), ([0, 1, 2, 3], [0, 1]), ([0, 1, 2, 3], [0, 1])]
    for layer, (q, kv), width, seed in zip(model.model.layers, heads, [448, 512, 256, 384], range(4)):
        keep_heads(layer.self_attn, q, kv)
        keep_channels(layer.mlp, width, seed)
        add_flap_biases(layer, 10 + seed)
    return model, save(model, folder)


def llm_drop(folder):
    """Attention dropped in blocks 0 and 2, the MLP in block 1 and the last block (with LLM-Drop's lists)."""
    model = base_model(5, seed=2)
    layers = model.model.layers
    for i in (0, 2):
        drop_attention(layers[i])
    for i in (1, 4):
        drop_mlp(layers[i])
    return model, save(model, folder, drop_attn_list=[0, 2], drop_mlp_list=[1, 4])


def uniform_stale(folder):
    """Every block pruned alike (2 of 4 heads, one KV group, FFN 384) with the original config."""
    model = base_model(3, seed=3)
    for i, layer in enumerate(model.model.layers):
        keep_heads(layer.self_attn, [2, 3], [1])
        keep_channels(layer.mlp, 384, i)
    return model, save(model, folder)


DECILM_BLOCKS = [
    {"attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False},
     "ffn": {"ffn_mult": 2.0, "no_op": False, "replace_with_linear": False}},        # 4/2, ffn 512
    {"attention": {"n_heads_in_group": None, "no_op": False, "replace_with_linear": True},
     "ffn": {"ffn_mult": 1.5, "no_op": False, "replace_with_linear": False}},        # linear, ffn 256
    {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
     "ffn": {"ffn_mult": 4.0, "no_op": False, "replace_with_linear": False}},        # none, ffn 768
    {"attention": {"n_heads_in_group": 4, "no_op": False, "replace_with_linear": False},
     "ffn": {"ffn_mult": None, "no_op": True, "replace_with_linear": False}},        # 4/1, no MLP
]


def decilm(folder):
    """A DeciLM (Nemotron-51B style) model: ``block_configs`` with GQA groups, linear attention,
    an attention-free block and an MLP-free block; widths from ``ffn_mult`` as DeciLM computes them."""
    model = base_model(4, seed=4)
    layers = model.model.layers
    g = torch.Generator().manual_seed(44)
    for layer, width in zip(layers, [512, 256, 768, 0]):
        if width:
            layer.mlp.gate_proj = _linear(torch.randn(width, D, generator=g) * 0.05)
            layer.mlp.up_proj = _linear(torch.randn(width, D, generator=g) * 0.05)
            layer.mlp.down_proj = _linear(torch.randn(D, width, generator=g) * 0.05)
    attn = layers[3].self_attn                      # 4 query heads share one KV head
    attn.k_proj = _linear(attn.k_proj.weight[:HEAD_DIM])
    attn.v_proj = _linear(attn.v_proj.weight[:HEAD_DIM])
    attn.num_key_value_groups = 4
    linear_attention(layers[1], 5)
    drop_attention(layers[2])
    drop_mlp(layers[3])
    return model, save(model, folder, architectures=["DeciLMForCausalLM"], model_type="nemotron-nas",
                       block_configs=DECILM_BLOCKS, num_key_value_heads=None, intermediate_size=None)


LAYOUTS = {"llm-pruner": llm_pruner, "flap": flap, "llm-drop": llm_drop, "decilm": decilm}
