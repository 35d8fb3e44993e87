"""A transformers model whose modules carry each block's own shapes, for the jobs that run the
Hugging Face model (imatrix, eval's KLD base, optimize's probing).

``from_pretrained`` cannot load a width-pruned checkpoint (its config is stale: every
``q_proj`` / ``gate_proj`` has another size than the config says), one with removed sub-blocks,
or a DeciLM (remote code). Here a ``LlamaForCausalLM`` is built from the config and each block's
modules are resized, removed or replaced (DeciLM's linear attention) as the tensors say, then the
weights are loaded strictly: every tensor used, every module filled.
"""

from __future__ import annotations

import functools
from pathlib import Path


def per_block_shapes(model_dir: Path):
    """(shapes, stored block indices, hp) when the checkpoint's blocks are not what its config
    describes (then ``from_pretrained`` cannot load it); None otherwise."""
    from shortquant.layers import group_block_tensors
    from shortquant.source.checkpoint import open_checkpoint

    from . import find_family
    from .shapes import read_block_shapes, uniform

    checkpoint = open_checkpoint(Path(model_dir))
    family = find_family(checkpoint)
    if family.per_layer_arch is None:
        return None
    hp = family.hparams(checkpoint.config, checkpoint.folder / "config.json")
    blocks, _ = group_block_tensors(checkpoint.tensors, family.block_prefix)
    stored = sorted(blocks)
    shapes = read_block_shapes(blocks, stored, checkpoint.tensors, hp, checkpoint.config, checkpoint.folder)
    first = shapes[0]
    if (uniform(shapes) and (first.n_head, first.n_head_kv, first.n_ff) == (hp["n_head"], hp["n_head_kv"], hp["n_ff"])
            and "block_configs" not in checkpoint.config):
        return None
    return shapes, stored, hp, checkpoint


def load_per_block_model(model_dir: Path, dtype=None):
    """The model with per-block shapes, or None when ``from_pretrained`` can load it as it is."""
    found = per_block_shapes(model_dir)
    if found is None:
        return None
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes, stored, hp, checkpoint = found
    config = {k: v for k, v in checkpoint.config.items() if k not in ("block_configs", "architectures", "model_type",
                                                                       "auto_map", "drop_attn_list", "drop_mlp_list")}
    config.update(num_hidden_layers=len(shapes), num_attention_heads=hp["n_head"], head_dim=hp["head_dim"],
                  num_key_value_heads=hp["n_head_kv"], intermediate_size=max(s.n_ff for s in shapes) or 1,
                  attention_bias=False, mlp_bias=False)
    cfg = LlamaConfig(**config)
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    for layer, shape, index in zip(model.model.layers, shapes, stored):
        biases = {part for part, name in (("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"),
                                          ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))
                  if f"model.layers.{index}.{name}.bias" in checkpoint.tensors}
        reshape_block(layer, shape, hp, biases)
    state = {}
    for name, ref in checkpoint.tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        state[renumber(name, stored)] = torch.from_numpy(ref.load())
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)   # buffers were on meta
    return model.to(dtype or torch.float32).eval()


def renumber(name: str, stored) -> str:
    prefix = "model.layers."
    if not name.startswith(prefix):
        return name
    index, rest = name[len(prefix):].split(".", 1)
    return f"{prefix}{list(stored).index(int(index))}.{rest}"


def reshape_block(layer, shape, hp, biases=frozenset()) -> None:
    """Give one decoder layer the modules its tensors describe (``biases``: which of o, gate, up,
    down have one)."""
    import torch
    from torch import nn

    NoAttention, NoMLP, LinearAttention = _modules()

    d, head_dim = hp["n_embd"], hp["head_dim"]
    attn, mlp = layer.self_attn, layer.mlp
    with torch.device("meta"):
        if not shape.n_head:
            layer.self_attn, layer.input_layernorm = NoAttention(), nn.Identity()
        elif not shape.n_head_kv:
            layer.self_attn = LinearAttention(d)
        else:
            q, kv = shape.n_head * head_dim, shape.n_head_kv * head_dim
            attn.q_proj, attn.k_proj = nn.Linear(d, q, bias=False), nn.Linear(d, kv, bias=False)
            attn.v_proj, attn.o_proj = nn.Linear(d, kv, bias=False), nn.Linear(q, d, bias="o" in biases)
            attn.num_key_value_groups = shape.n_head // shape.n_head_kv
        if not shape.n_ff:
            layer.mlp, layer.post_attention_layernorm = NoMLP(), nn.Identity()
        else:
            mlp.gate_proj = nn.Linear(d, shape.n_ff, bias="gate" in biases)
            mlp.up_proj = nn.Linear(d, shape.n_ff, bias="up" in biases)
            mlp.down_proj = nn.Linear(shape.n_ff, d, bias="down" in biases)


@functools.cache
def _modules():
    import torch
    from torch import nn

    class NoAttention(nn.Module):
        """A removed attention: adds nothing."""

        def forward(self, hidden_states, *args, **kwargs):
            return torch.zeros_like(hidden_states), None

    class NoMLP(nn.Module):
        def forward(self, hidden_states):
            return torch.zeros_like(hidden_states)

    class LinearAttention(nn.Module):
        """DeciLM's ``replace_with_linear`` attention: one projection of the normed input."""

        def __init__(self, d: int):
            super().__init__()
            self.linear_attn = nn.Linear(d, d, bias=False)

        def forward(self, hidden_states, *args, **kwargs):
            return self.linear_attn(hidden_states), None

    return NoAttention, NoMLP, LinearAttention


def load_torch_model(model_dir: Path, dtype=None):
    """The checkpoint as a transformers model (eval mode, blocks renumbered ``0..N-1`` in stored
    order), the one torch model every job that runs the Hugging Face model uses.

    Interim body: the per-block builder or the probe's renumbering loader; issue 20 replaces it
    with one strict builder from the block map.
    """
    from shortquant.layers import group_block_tensors
    from shortquant.quant.probe import load_probe_model
    from shortquant.source.checkpoint import open_checkpoint

    from . import find_family

    checkpoint = open_checkpoint(Path(model_dir))
    blocks, _ = group_block_tensors(checkpoint.tensors, find_family(checkpoint).block_prefix)
    model = load_probe_model(Path(model_dir), sorted(blocks))
    return model if dtype is None else model.to(dtype)
