"""One reading of a checkpoint's blocks: the description export plans from and the torch model is
built from (``hf_model.load_torch_model``).

Which blocks the tensors hold (gaps renumbered, a stale ``num_hidden_layers`` followed), each
block's own shapes (width pruning, removed attention / MLP, DeciLM), which tensors every present
sub-block must have, and what is left over. Two jobs reading a checkpoint two ways is how
``imatrix`` and ``eval --base`` once measured another model than the one exported; here it is
read once, and every check fails with a one-line error naming the folder, the block and the tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from shortquant.errors import LayoutError, WeightError
from shortquant.layers import (CONFIG_PRUNING, BlockMap, check_block_tensors, group_block_tensors, make_block_map,
                               pruned_config)
from shortquant.layers import remove_blocks as remove_blocks_from
from shortquant.plan import BlockShape

from . import moe
from .family import Family
from .shapes import ATTN_NORM, FFN_NORM, read_block_shapes


@dataclass(frozen=True)
class Layout:
    """A checkpoint's blocks as its tensors say. ``blocks[stored][suffix]`` is a tensor name;
    ``shapes[n]`` belongs to written block ``n`` = ``block_map.stored[n]``; ``hp`` holds the
    family's hyper-parameters plus ``vocab_size`` and ``n_layer`` from the tensors."""

    family: Family
    checkpoint: object
    hp: dict
    blocks: dict[int, dict[str, str]]
    block_map: BlockMap
    shapes: tuple[BlockShape, ...]
    experts: dict = field(default_factory=dict)   # stored index -> moe.ExpertBlock (MoE families)
    warnings: tuple[str, ...] = ()                # what config.json says wrongly about the experts

    @property
    def stored(self) -> tuple[int, ...]:
        return self.block_map.stored

    @property
    def tied(self) -> bool:
        """No output head of its own: the embedding is reused (``tie_word_embeddings``)."""
        return self.family.lm_head not in self.checkpoint.tensors

    def unused(self) -> set[str]:
        """Tensors nothing reads: ignored ones (rotary caches) and the norm a removed sub-block left."""
        out = set()
        for n, index in enumerate(self.stored):
            present, shape = self.blocks[index], self.shapes[n]
            out |= {present[s] for s in self.family.ignored_block_tensors if s in present}
            if not shape.n_head and ATTN_NORM in present:
                out.add(present[ATTN_NORM])
            if not shape.n_ff and FFN_NORM in present:
                out.add(present[FFN_NORM])
        return out


def sub_block(suffix: str) -> str:
    """Which half of a block a tensor belongs to: "attn" or "mlp"."""
    return "attn" if suffix.startswith(("self_attn.", "input_layernorm")) else "mlp"


def read_layout(checkpoint, family: Family, *, source_blocks: Sequence[int] | None = None,
                recipe=None, remove_blocks: Sequence[int] | None = None, pruning_method: str | None = None) -> Layout:
    """The ``Layout`` of ``checkpoint`` as ``family`` reads it (no weights read; the caller finds
    the family, so this module stays below the package's registry); ``source_blocks`` / ``recipe``
    only say where the blocks came from (``BlockMap.original``). ``remove_blocks`` (stored indices):
    the layout of the checkpoint saved without them, its config read as that checkpoint's would be
    (``layout.checkpoint`` carries it; ``pruning_method`` says how they were chosen)."""
    folder = checkpoint.folder
    table = {**family.block_tensors, **family.optional_block_tensors}
    try:
        blocks, others = group_block_tensors(checkpoint.tensors, family.block_prefix)
        # a mixture of experts: the router and experts taken out of the blocks (families/moe.py)
        experts = moe.split_experts(blocks, family.experts, checkpoint.tensors, folder) if family.experts else {}
        check_block_tensors(blocks, [], list(table) + list(family.ignored_block_tensors))
        block_map = make_block_map(
            list(blocks), checkpoint.config.get("num_hidden_layers"), source_blocks=source_blocks,
            recipe_kept=recipe.kept_blocks if recipe else None,
            recipe_source_count=recipe.pruning.source_block_count if recipe else None,
            recipe_name=recipe.name if recipe else None, saved=checkpoint.config.get(CONFIG_PRUNING))
        if remove_blocks:
            full = block_map
            block_map = remove_blocks_from(full, remove_blocks, pruning_method)
            checkpoint = dataclasses.replace(checkpoint, config=pruned_config(checkpoint.config, full.stored,
                                                                              block_map.stored, renumber=False))
    except LayoutError as exc:
        if exc.path is not None:
            raise
        raise LayoutError(str(exc), folder) from None
    hp = family.hparams(checkpoint.config, folder / "config.json")

    embed, final_norm, lm_head = family.embed, family.final_norm, family.lm_head
    missing = [n for n in (embed, final_norm) if n not in checkpoint.tensors]
    if missing:
        raise WeightError(f"missing tensor {missing[0]!r}", folder)
    unexpected = [n for n in others if n not in (embed, final_norm, lm_head, family.final_norm_bias)]
    if unexpected:
        raise WeightError(f"unexpected tensor {unexpected[0]!r} for a {family.name} checkpoint", folder)
    if lm_head not in checkpoint.tensors and not checkpoint.config.get("tie_word_embeddings", False):
        raise WeightError(f"missing tensor {lm_head!r} (and tie_word_embeddings is false)", folder)

    vocab = checkpoint.tensors[embed].shape[0]
    if checkpoint.config.get("vocab_size") not in (None, vocab):
        raise WeightError(f"{embed} has {vocab} rows but config.json says vocab_size="
                          f"{checkpoint.config['vocab_size']}", folder)
    hp.update(vocab_size=vocab, n_layer=block_map.block_count)

    if family.final_norm_bias is not None and family.final_norm_bias not in checkpoint.tensors:
        raise WeightError(f"missing tensor {family.final_norm_bias!r}", folder)

    gateless = not any(s == "mlp.gate_proj.weight" for s in table)   # Nemotron's MLP (and experts' blocks)
    shapes = read_block_shapes(blocks, block_map.stored, checkpoint.tensors, hp, checkpoint.config, folder,
                               gateless=gateless)
    if family.check_block_shapes is not None:
        family.check_block_shapes(checkpoint.config, hp, shapes, block_map.stored, folder)
    warnings = ()
    if experts:
        shapes, found = moe.plan_experts(hp, experts, block_map.stored, shapes, checkpoint.config, folder)
        warnings = tuple(found)
    for index, shape in zip(block_map.stored, shapes):
        has = {"attn": shape.n_head > 0 and shape.n_head_kv > 0, "mlp": shape.n_ff > 0}
        for suffix in family.block_tensors:
            if has[sub_block(suffix)] and suffix not in blocks[index]:
                raise WeightError(f"block {index} is missing tensor {suffix!r}", folder)
    return Layout(family, checkpoint, hp, blocks, block_map, shapes, experts, warnings)
