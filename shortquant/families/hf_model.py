"""THE torch model of a checkpoint, for every job that runs the Hugging Face model: ``imatrix
FOLDER``, ``eval --base FOLDER`` and ``export --optimize``'s probes.

``from_pretrained`` trusts config.json. A pruned checkpoint saved with gaps in its block indices,
a stale ``num_hidden_layers`` or stale widths gets blocks of random weights ("newly initialized")
and the job carries on, measuring another model than the one exported. Here the model is built
from the same reading export plans from (``layout.read_layout``): the family's transformers class
(``Family.torch_model``) with as many blocks as the tensors hold, made on the meta device, each
block's projections sized as its own tensors say, a removed attention / MLP replaced by a module
that adds nothing, DeciLM's linear attention as its one projection. Then every weight is assigned
strictly: a parameter without a tensor or a tensor without a parameter is a one-line WeightError
naming the folder, the block and the tensor. Nothing is ever initialised at random.

    >>> model = load_torch_model(Path("models/demo"))          # doctest: +SKIP
    >>> model(input_ids=torch.tensor([[1, 403, 407]])).logits   # doctest: +SKIP
"""

from __future__ import annotations

import functools
from pathlib import Path

from shortquant.errors import SourceError, WeightError

from .torch_names import NOT_MODEL_KEYS, model_class, torch_name

# config.json keys holding one value per block: they follow the kept blocks
PER_BLOCK_KEYS = ("layer_types",)


def load_torch_model(model_dir: Path, dtype=None, *, stream_blocks: bool = False):
    """The checkpoint as a transformers model in eval mode (``dtype``: float32 by default), blocks
    numbered ``0..N-1`` in stored order (:func:`torch_name` maps a tensor name onto it).

    ``stream_blocks``: the decoder blocks stay on the meta device (no memory) and
    ``model.block_weights`` (a :class:`BlockWeights`) materializes one at a time from the
    checkpoint, for jobs that run a model larger than memory block by block (``prune``). Every
    name and shape is checked here all the same; a mixture of experts is always loaded whole.

    Raises a ShortquantError (exit 2) for a checkpoint export would refuse and for any weight the
    model lacks or leaves unused.
    """
    import torch

    from shortquant.source.checkpoint import open_checkpoint

    from . import find_family
    from .layout import read_layout

    dtype = dtype or torch.float32
    checkpoint = open_checkpoint(Path(model_dir))
    layout = read_layout(checkpoint, find_family(checkpoint))
    folder = layout.checkpoint.folder
    if layout.experts:   # a mixture of experts: its experts fused as transformers 5 holds them
        from .moe_torch import load_moe_model

        return load_moe_model(layout, dtype)
    try:
        config = torch_config(layout)
        with torch.device("meta"):
            model = model_class(layout.family)(config)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SourceError(f"transformers cannot build the {layout.family.torch_model}: {_first_line(exc)}",
                          folder) from None
    for layer, index, shape in zip(model.get_submodule(layout.family.block_prefix), layout.stored, layout.shapes):
        reshape_block(layer, shape, layout.hp, set(layout.blocks[index]))
    streamed = assign_weights(model, layout, dtype, stream_blocks)
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):   # its frequencies are computed, not stored: make them for real
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(module)(config=config))
    prefix = layout.family.block_prefix + "."
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and not (streamed and n.startswith(prefix))]
    if left:
        raise AssertionError(f"{folder}: torch model left {left[0]} uninitialised")
    model = model.to(dtype).eval()
    if streamed:
        model.block_weights = streamed
    return model


def torch_config(layout):
    """The transformers config of the model the tensors hold: their block count, head size,
    vocabulary and (where the blocks are alike) head counts and FFN width; tied when no head."""
    hp, shapes, stored = layout.hp, layout.shapes, layout.stored
    config = {k: v for k, v in layout.checkpoint.config.items() if k not in NOT_MODEL_KEYS}
    for key in PER_BLOCK_KEYS:
        values = config.get(key)
        if isinstance(values, list) and len(values) != len(stored):
            if len(values) > stored[-1]:
                config[key] = [values[i] for i in stored]
            else:
                del config[key]   # neither the stored blocks nor the original ones: transformers' default
    full = [s for s in shapes if s.n_head and s.n_head_kv]
    heads = (full[0].n_head, full[0].n_head_kv) if full else (hp["n_head"], hp["n_head_kv"])
    config.update(num_hidden_layers=len(shapes), hidden_size=hp["n_embd"], head_dim=hp["head_dim"],
                  num_attention_heads=heads[0], num_key_value_heads=heads[1],
                  intermediate_size=max(s.n_ff for s in shapes) or 1, vocab_size=hp["vocab_size"],
                  tie_word_embeddings=layout.tied)
    return model_class(layout.family).config_class.from_dict(config)


def reshape_block(layer, shape, hp, present) -> None:
    """Give one decoder layer the modules its tensors describe (``present``: its tensor suffixes;
    a projection has a bias exactly when the checkpoint stores one). Modules the class already
    built as the tensors say are kept."""
    import torch
    from torch import nn

    NoAttention, NoMLP, LinearAttention = _modules()
    d, head_dim = hp["n_embd"], hp["head_dim"]

    def fit(parent, part, projections):
        for name, n_in, n_out in projections:
            if not hasattr(parent, name):
                continue   # a projection the family does not have (Nemotron's MLP has no gate)
            bias = f"{part}.{name}.bias" in present
            old = getattr(parent, name)
            if (old.in_features, old.out_features, old.bias is not None) != (n_in, n_out, bias):
                setattr(parent, name, nn.Linear(n_in, n_out, bias=bias))

    with torch.device("meta"):
        if not shape.n_head:
            layer.self_attn, layer.input_layernorm = NoAttention(), nn.Identity()
        elif not shape.n_head_kv:
            layer.self_attn = LinearAttention(d)
        else:
            q, kv = shape.n_head * head_dim, shape.n_head_kv * head_dim
            fit(layer.self_attn, "self_attn",
                (("q_proj", d, q), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", q, d)))
            layer.self_attn.num_key_value_groups = shape.n_head // shape.n_head_kv
        if not shape.n_ff:
            layer.mlp, layer.post_attention_layernorm = NoMLP(), nn.Identity()
        else:
            ff = shape.n_ff
            fit(layer.mlp, "mlp", (("gate_proj", d, ff), ("up_proj", d, ff), ("down_proj", ff, d)))


def assign_weights(model, layout, dtype, stream_blocks: bool = False):
    """Every parameter from its checkpoint tensor, every used tensor to a parameter, shapes equal.
    With ``stream_blocks`` the blocks' tensors are checked but left to the returned
    :class:`BlockWeights` (else None)."""
    import torch

    family, checkpoint, stored = layout.family, layout.checkpoint, layout.stored
    prefix, folder = family.block_prefix, checkpoint.folder
    unused = layout.unused()
    sources = {torch_name(n, stored, prefix): n for n in checkpoint.tensors if n not in unused}
    wanted = dict(model.state_dict(keep_vars=True))
    if layout.tied:
        wanted.pop(family.lm_head, None)   # the embedding, tied below

    def where(torch_key: str) -> str:
        if torch_key.startswith(prefix + "."):
            n, rest = torch_key[len(prefix) + 1:].split(".", 1)
            return f"block {stored[int(n)]}: tensor {rest!r}"
        return f"tensor {torch_key!r}"

    for key in wanted:
        if key not in sources:
            raise WeightError(f"{where(key)} is missing; the {family.torch_model} needs it", folder)
    for key, name in sources.items():
        if key not in wanted:
            raise WeightError(f"{where(key)} is left over: the {family.torch_model} has no place for it", folder)
        ref = checkpoint.tensors[name]
        if tuple(ref.shape) != tuple(wanted[key].shape):
            raise WeightError(f"{where(key)} has shape {list(ref.shape)} but the {family.torch_model} needs "
                              f"{list(wanted[key].shape)}", folder)
    blocks = None
    if stream_blocks:
        per_block: list[dict[str, str]] = [{} for _ in stored]
        for key in [k for k in sources if k.startswith(prefix + ".")]:
            n, rest = key[len(prefix) + 1:].split(".", 1)
            per_block[int(n)][rest] = sources.pop(key)
        blocks = BlockWeights(checkpoint, per_block, dtype)
    model.load_state_dict(_load_state(checkpoint, sources, dtype), strict=not (layout.tied or blocks), assign=True)
    if layout.tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return blocks


def _load_state(checkpoint, sources: dict[str, str], dtype) -> dict:
    """torch key -> the checkpoint tensor ``sources[key]`` names, as a ``dtype`` tensor."""
    import torch

    return {key: torch.from_numpy(checkpoint.tensors[name].load()).to(dtype) for key, name in sources.items()}


class BlockWeights:
    """The decoder blocks' tensors of a model built with ``stream_blocks`` (names and shapes
    already checked by :func:`assign_weights`): :meth:`load` gives block ``b``'s module its
    weights, :meth:`release` returns them to the meta device. One block is loaded at a time:
    float32 weights are read into the same buffers block after block (a fresh 0.8 GB a 7B block
    costs more in page faults than the read itself)."""

    def __init__(self, checkpoint, per_block: list[dict[str, str]], dtype):
        self.checkpoint, self.per_block, self.dtype = checkpoint, per_block, dtype
        self._buffers: dict[str, object] = {}
        self.loaded: int | None = None

    def load(self, layer, b: int) -> None:
        import numpy as np
        import torch

        if self.loaded is not None:
            raise AssertionError(f"block {b} loaded while block {self.loaded} still is")
        if self.dtype != torch.float32:
            state = _load_state(self.checkpoint, self.per_block[b], self.dtype)
        else:
            state = {}
            for key, name in self.per_block[b].items():
                ref = self.checkpoint.tensors[name]
                buffer = self._buffers.get(key)
                if buffer is None or buffer.size < ref.n_elements:
                    buffer = self._buffers[key] = np.empty(ref.n_elements, dtype=np.float32)
                state[key] = torch.from_numpy(ref.load_rows(0, ref.shape[0], buffer))
        layer.load_state_dict(state, strict=True, assign=True)
        self.loaded = b

    def release(self, layer) -> None:
        layer.to("meta")
        self.loaded = None

    def block_bytes(self, b: int) -> int:
        """Block ``b``'s size once loaded (bytes)."""
        import torch

        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(self.checkpoint.tensors[n].n_elements for n in self.per_block[b].values()) * size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@functools.cache
def _modules():
    import torch
    from torch import nn

    class NoAttention(nn.Module):
        """A removed attention: adds nothing."""

        def forward(self, hidden_states, *args, **kwargs):
            return torch.zeros_like(hidden_states), None

    class NoMLP(nn.Module):
        """A removed MLP: adds nothing."""

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
