"""The plan: every decision about a GGUF file, made before any weight is read.

A ``ModelPlan`` says what the model becomes (architecture, metadata, block map, tokenizer and,
for every tensor, its GGUF name, source and transform). A ``FilePlan`` adds one output type:
the tensor types and the file name (``quant.mixes.plan_file`` makes one, beside the rules it
runs). Both are plain values: ``shortquant inspect`` prints them,
tests check them, and the stream/writer stages only carry them out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

from .layers import BlockMap


class Transform(enum.Enum):
    """What happens to a source tensor on its way to the file."""

    NONE = "none"
    PERMUTE_Q = "permute_q"   # rotary rows: HF (half-split) -> llama.cpp (interleaved), by n_head
    PERMUTE_K = "permute_k"   # same, by n_head_kv
    ADD_ONE = "add_one"       # a LayerNorm weight stored minus one (Nemotron's layernorm1p)


@dataclass(frozen=True)
class Stack:
    """A tensor assembled from several source tensors: mixture-of-experts weights stacked on a
    new first axis (llama.cpp's ``*_exps``), one source per expert, or a slice of one fused
    source of shape (experts, rows, cols) when ``rows`` says which rows of its second axis."""

    sources: tuple[str, ...]
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class TensorPlan:
    name: str                       # GGUF tensor name, e.g. "blk.0.attn_q.weight"
    source: str                     # source tensor name
    shape: tuple[int, ...]          # numpy/torch shape as written: (rows, cols)
    kind: gguf.MODEL_TENSOR         # what the tensor is, for shape checks and type rules
    transform: Transform = Transform.NONE
    heads: int | None = None        # head count used by the permutation
    values: tuple[float, ...] | None = None   # a tensor computed from the config, not read
    fill: float | None = None       # a constant tensor written for llama.cpp (deci workarounds), not read
    stack: Stack | None = None      # experts stacked from several sources (``source`` then only describes them)

    @property
    def computed(self) -> bool:
        return self.values is not None or self.fill is not None

    def computed_rows(self, start: int, stop: int):
        """Rows ``start:stop`` of a computed tensor (the whole tensor when it is 1-D), float32."""
        import numpy as np

        if self.fill is not None:
            shape = (stop - start, *self.shape[1:]) if len(self.shape) > 1 else self.shape
            return np.full(shape, self.fill, dtype=np.float32)
        values = np.asarray(self.values, dtype=np.float32).reshape(self.shape)
        return values[start:stop] if len(self.shape) > 1 else values

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class BlockShape:
    """One block's shapes as its tensors hold them; 0 means the sub-block is absent
    (``n_head > 0`` with ``n_head_kv == 0``: DeciLM's linear attention)."""

    n_head: int
    n_head_kv: int
    n_ff: int                       # the FFN width; with experts, each expert's
    n_expert: int = 0               # experts of a mixture-of-experts FFN (0: a dense FFN)

    def describe(self) -> str:
        attn = ("no attention" if not self.n_head else "linear attention" if not self.n_head_kv
                else f"heads {self.n_head}/{self.n_head_kv}")
        ffn = (f"{self.n_expert} experts of ffn {self.n_ff}" if self.n_expert else
               f"ffn {self.n_ff}" if self.n_ff else "no MLP")
        return f"{attn}, {ffn}"


@dataclass(frozen=True)
class MetaItem:
    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass(frozen=True)
class Naming:
    name: str                       # general.name
    basename: str
    size_label: str                 # from the parameters actually written
    finetune: str | None = None
    version: str | None = None

    def file_name(self, type_label: str) -> str:
        """``<BaseName>-<SizeLabel>-<FineTune>-<Version>-<Type>.gguf``"""
        return gguf.utility.naming_convention(None, self.basename, self.finetune, self.version,
                                              self.size_label, type_label) + ".gguf"


@dataclass(frozen=True)
class ModelPlan:
    source: Path
    converter: str
    arch: str
    naming: Naming
    block_map: BlockMap
    hparams: dict[str, Any]         # n_layer, n_head, n_head_kv, ... (for type choice and display)
    metadata: tuple[MetaItem, ...]  # everything but tokenizer and file type
    tensors: tuple[TensorPlan, ...]
    tokenizer: Any | None = None    # shortquant.tokenizer.TokenizerSpec
    warnings: tuple[str, ...] = ()
    block_shapes: tuple[BlockShape, ...] = ()   # per written block, as found in the tensors
    arch_reason: str | None = None  # why the per-layer architecture (deci) was chosen

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)


@dataclass(frozen=True)
class FilePlan:
    quant: str                      # user-facing type name, e.g. "q4_k_m"
    type_label: str                 # for the file name, e.g. "Q4_K_M"
    file_type: gguf.LlamaFileType
    tensor_types: dict[str, GGMLQuantizationType] = field(hash=False)
    path: Path

    def tensor_nbytes(self, tensor: TensorPlan) -> int:
        qtype = self.tensor_types[tensor.name]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        return tensor.n_elements // block * type_size

    def total_bytes(self, plan: ModelPlan) -> int:
        return sum(self.tensor_nbytes(t) for t in plan.tensors)


def describe(plan: ModelPlan, files: list[FilePlan] = ()) -> str:
    """A human-readable account of every decision, as ``shortquant inspect`` prints it."""
    from .sizes import format_size

    lines = [
        f"source:     {plan.source}",
        f"family:     {plan.converter}",
        f"arch:       {plan.arch}",
        f"name:       {plan.naming.name}  (basename {plan.naming.basename}, size {plan.naming.size_label}"
        + (f", finetune {plan.naming.finetune}" if plan.naming.finetune else "")
        + (f", version {plan.naming.version}" if plan.naming.version else "") + ")",
        f"parameters: {plan.n_params:,}",
        "hparams:    " + ", ".join(f"{k}={v}" for k, v in plan.hparams.items()),
        plan.block_map.describe(),
    ]
    if plan.arch_reason:
        lines.append(f"why {plan.arch}: {plan.arch_reason}")
    if plan.block_shapes and len(set(plan.block_shapes)) > 1:
        lines.append("block shapes (as the source tensors hold them):")
        lines += [f"  blk.{n:<3d} {shape.describe()}" for n, shape in enumerate(plan.block_shapes)]
    if plan.tokenizer is not None:
        tok = plan.tokenizer
        kind = f"BPE (gpt2, pre-tokenizer {tok.pre}, {len(tok.merges)} merges)" if tok.merges or tok.model == "gpt2" \
            else "sentencepiece (llama)"
        lines.append(f"tokenizer:  {kind}, {len(tok.tokens)} tokens, bos={tok.bos_id} eos={tok.eos_id} "
                     + (f"eot={tok.eot_id} " if tok.eot_id is not None else "")
                     + f"unk={tok.unk_id} pad={tok.pad_id}, add_bos={tok.add_bos}, chat template: "
                     f"{tok.chat_template_source or 'none'}")
    lines.append("metadata:")
    for item in plan.metadata:
        value = item.value
        if isinstance(value, (list, tuple)) and len(value) > 12:
            value = f"[{', '.join(map(str, value[:12]))}, ...] ({len(value)} items)"
        lines.append(f"  {item.key} = {value}")
    type_cols = "".join(f" {f.type_label:>8}" for f in files)
    lines.append("tensors:")
    lines.append(f"  {'tensor':<28} {'shape':<14} {'transform':<10}{type_cols}  source")
    for t in plan.tensors:
        types = "".join(f" {f.tensor_types[t.name].name:>8}" for f in files)
        shape = "x".join(map(str, t.shape))
        lines.append(f"  {t.name:<28} {shape:<14} {t.transform.value:<10}{types}  {t.source}")
    for f in files:
        lines.append(f"file: {f.path}  ({format_size(f.total_bytes(plan))} of tensor data)")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def plan_as_dict(plan: ModelPlan, files: list[FilePlan] = ()) -> dict[str, Any]:
    """The plan as JSON-ready data (``shortquant inspect --json``)."""
    bm = plan.block_map
    return {
        "source": str(plan.source), "converter": plan.converter, "arch": plan.arch,
        "name": plan.naming.name, "basename": plan.naming.basename, "size_label": plan.naming.size_label,
        "finetune": plan.naming.finetune, "version": plan.naming.version, "n_params": plan.n_params,
        "hparams": plan.hparams,
        "blocks": {"stored": list(bm.stored), "original": list(bm.original) if bm.original else None,
                   "source_block_count": bm.source_block_count, "removed": list(bm.removed) if bm.removed
                   is not None else None, "provenance": bm.provenance},
        "metadata": {m.key: m.value for m in plan.metadata},
        "tensors": [{"name": t.name, "source": t.source, "shape": list(t.shape), "transform": t.transform.value,
                     "types": {f.quant: f.tensor_types[t.name].name for f in files}} for t in plan.tensors],
        "files": [{"path": str(f.path), "type": f.type_label, "bytes": f.total_bytes(plan)} for f in files],
        "tokenizer": plan.tokenizer.summary() if plan.tokenizer is not None else None,
        "block_shapes": [{"n_head": b.n_head, "n_head_kv": b.n_head_kv, "n_ff": b.n_ff, "n_expert": b.n_expert}
                         for b in plan.block_shapes],
        "arch_reason": plan.arch_reason,
        "warnings": list(plan.warnings),
    }
