"""Builders for the mixture-of-experts tests: tiny random Qwen3-MoE / Mixtral models made with
transformers, their experts removed as REAP-style pruning removes them (the same experts'
rows cut from the router, the rest kept in order), saved in either tensor layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

MOE_CLASSES = {"qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "num_experts"),
               "mixtral": ("MixtralConfig", "MixtralForCausalLM", "num_local_experts")}


def build_moe_model(family: str, vocab_size: int, *, layers: int = 4, experts: int = 8, seed: int = 0,
                    **overrides):
    """A random transformers MoE model in f32, eval mode, norms perturbed so a wrong mapping shows."""
    import transformers

    config_cls, model_cls, count_key = MOE_CLASSES[family]
    kwargs = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256, rms_norm_eps=1e-5,
                  initializer_range=0.05, tie_word_embeddings=False, num_experts_per_tok=2)
    kwargs[count_key] = experts
    if family == "qwen3moe":
        kwargs.update(moe_intermediate_size=256, norm_topk_prob=True, head_dim=64)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                p.normal_(0, 0.05)   # transformers 5 leaves these to the initializer: make them real
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)    # decisive routing: no near-ties between llama.cpp and torch
    return model


def remove_experts(model, keep: dict[int, list[int]]) -> None:
    """Keep only experts ``keep[layer]`` (in that order) in each layer, router rows included."""
    for index, layer in enumerate(model.model.layers):
        kept = torch.tensor(keep[index])
        mlp = layer.mlp
        with torch.no_grad():
            mlp.experts.gate_up_proj = torch.nn.Parameter(mlp.experts.gate_up_proj[kept].clone())
            mlp.experts.down_proj = torch.nn.Parameter(mlp.experts.down_proj[kept].clone())
            mlp.gate.weight = torch.nn.Parameter(mlp.gate.weight[kept].clone())
        mlp.experts.num_experts = mlp.gate.num_experts = len(kept)
    count = len(keep[0])
    key = "num_experts" if hasattr(model.config, "num_experts") else "num_local_experts"
    setattr(model.config, key, count)


def save_layout(model, folder: Path, layout: str, *, expert_ids: dict[int, list[int]] | None = None,
                **config_changes) -> None:
    """Save ``model`` with its experts ``fused`` (transformers 5), one tensor per expert as the hub
    holds Qwen3-MoE (``hub``) or Mixtral (``mixtral-hub``); ``expert_ids`` names the stored
    experts of each layer (default 0..E-1: renumbered after pruning; else gaps stay)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out = {}
    for name, value in state.items():
        m = re.match(r"^(model\.layers\.(\d+)\.)mlp\.(experts\.(gate_up_proj|down_proj)|gate\.weight)$", name)
        if layout == "fused" or m is None:
            out[name] = value
            continue
        prefix, layer = m.group(1), int(m.group(2))
        moe = "mlp" if layout == "hub" else "block_sparse_moe"
        if m.group(3) == "gate.weight":
            out[f"{prefix}{moe}.gate.weight"] = value
            continue
        ids = (expert_ids or {}).get(layer, list(range(value.shape[0])))
        names = {"hub": ("gate_proj", "up_proj", "down_proj"), "mixtral-hub": ("w1", "w3", "w2")}[layout]
        for e, expert in zip(ids, value):
            base = f"{prefix}{moe}.experts.{e}."
            if m.group(4) == "gate_up_proj":
                width = expert.shape[0] // 2
                out[base + names[0] + ".weight"] = expert[:width].clone()
                out[base + names[1] + ".weight"] = expert[width:].clone()
            else:
                out[base + names[2] + ".weight"] = expert.clone()
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") == "qwen3_moe" and "num_local_experts" in config:
        config["num_experts"] = config.pop("num_local_experts")   # as Qwen's hub configs spell it
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
