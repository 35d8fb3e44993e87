"""The transformers model of a mixture-of-experts checkpoint as its tensors hold it.

``from_pretrained`` cannot load an expert-pruned checkpoint whose config still counts the removed
experts, one whose experts keep their original indices (gaps), or one with removed blocks. Here
the model is built from the same reading the export plans from (``layout.read_layout``, experts by
``families/moe.py``): ``num_experts`` and ``num_hidden_layers`` from the tensors, each block's
experts fused into transformers 5's ``gate_up_proj`` / ``down_proj`` from either layout, blocks
renumbered 0..N-1 in stored order, and the weights loaded strictly (every tensor used, every
parameter filled).
"""

from __future__ import annotations

import numpy as np

from shortquant.source.experts import tensor_ref

from . import moe


def load_moe_model(layout, dtype):
    """The model of ``layout`` (a ``layout.Layout`` with experts) in ``dtype``, eval mode."""
    import torch

    from .torch_names import NOT_MODEL_KEYS, model_class, torch_name

    family, checkpoint, stored = layout.family, layout.checkpoint, layout.stored
    count = layout.hp["n_expert"]
    config = {k: v for k, v in checkpoint.config.items() if k not in NOT_MODEL_KEYS + ("removed_experts",)}
    config.update(num_hidden_layers=len(stored), num_experts=count, num_local_experts=count,
                  vocab_size=layout.hp["vocab_size"], tie_word_embeddings=layout.tied)
    cls = model_class(family)
    cfg = cls.config_class.from_dict(config)
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = cls(cfg)

    def load(t) -> torch.Tensor:
        ref = tensor_ref(checkpoint.tensors, t)
        return torch.from_numpy(np.ascontiguousarray(ref.load()).reshape(ref.shape)).to(dtype)

    state = {}
    prefix = family.block_prefix + "."
    for n, index in enumerate(stored):
        plans = moe.expert_tensors(layout.experts[index], n, lambda kind, b: f"{kind.name}.{b}", cfg.hidden_size)
        router, gate, up, down = (load(p) for p in plans)
        base = f"{prefix}{n}.mlp."
        state[base + "gate.weight"] = router
        state[base + "experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        state[base + "experts.down_proj"] = down
        del gate, up
    unused = layout.unused()
    for name in checkpoint.tensors:
        if name in unused or (name.startswith(prefix) and _is_expert(name, layout)):
            continue
        state[torch_name(name, stored, family.block_prefix)] = load(_Named(name))
    if layout.tied:
        state[family.lm_head] = state[family.embed]
    model.load_state_dict(state, strict=True, assign=True)
    if layout.tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)   # its buffers were on meta
    return model.eval()


def _is_expert(name: str, layout) -> bool:
    """A router or expert tensor (read above, stacked), not a block tensor of its own."""
    index, suffix = name[len(layout.family.block_prefix) + 1:].split(".", 1)
    return suffix not in layout.blocks.get(int(index), {})


class _Named:
    """A plain source tensor in ``tensor_ref``'s terms."""

    stack = None

    def __init__(self, source: str):
        self.source = source
