"""llama.cpp's ``deci`` architecture: LLaMA blocks with per-layer head counts and FFN widths.

``deci`` reads ``head_count``, ``head_count_kv`` and ``feed_forward_length`` as per-layer arrays:
``head_count = 0`` is a block without attention, ``head_count > 0`` with ``head_count_kv = 0`` is
DeciLM's linear attention (``attn_output`` applied to the normed input). Two llama.cpp behaviours
(vendored in llama-cpp-python 0.3.36; tests/test_deci.py fails when either changes) are worked
around with exact stand-ins:

* ``feed_forward_length = 0`` skips the residual update of the whole layer (its attention output
  is thrown away) and aborts decoding when it is the last layer: a block without an MLP is
  written with an all-zero FFN of ``ZERO_FFN`` channels (``ffn_norm`` ones), which adds exactly 0;
* ``head_count = 0`` in layer 0 makes the head size 0 and loading fails: a layer 0 without
  attention is written as linear attention with a zero ``attn_output`` (``attn_norm`` ones),
  which also adds exactly 0.

Also the DeciLM family (``DeciLMForCausalLM``): its ``block_configs`` are checked against the tensors.
"""

from __future__ import annotations

from typing import Callable

from gguf import MODEL_ARCH, MODEL_TENSOR, GGUFValueType, Keys

from shortquant import keys
from shortquant.errors import ConfigError, WeightError
from shortquant.plan import BlockShape, MetaItem, TensorPlan, Transform

from .family import LLAMA_BLOCK, LLAMA_OPTIONAL_BIASES, Family
from .shapes import LINEAR_ATTN
from .hparams import llama3_rope_factors, llama_style_hparams, rope_scaling_metadata

ZERO_FFN = 256   # channels of the stand-in FFN: a multiple of every quant type's block size
STAND_IN = "(zero stand-in for llama.cpp's deci, see shortquant/families/deci.py)"


def written_shapes(shapes: tuple[BlockShape, ...]) -> tuple[BlockShape, ...]:
    """The per-layer values written to the file: the source shapes with the stand-ins applied."""
    heads = next((s.n_head for s in shapes if s.n_head), 0)
    if not heads:
        raise ValueError("no block has attention")
    out = []
    for n, s in enumerate(shapes):
        n_head, n_head_kv = (heads, 0) if n == 0 and not s.n_head else (s.n_head, s.n_head_kv)
        out.append(BlockShape(n_head, n_head_kv, s.n_ff or ZERO_FFN))
    return tuple(out)


def stand_in_attention(n: int, hp: dict, name: Callable) -> list[TensorPlan]:
    """Layer 0 without attention: linear attention whose output is zero."""
    d = hp["n_embd"]
    return [TensorPlan(name(MODEL_TENSOR.ATTN_NORM, n), STAND_IN, (d,), MODEL_TENSOR.ATTN_NORM, fill=1.0),
            TensorPlan(name(MODEL_TENSOR.ATTN_OUT, n), STAND_IN, (d, d), MODEL_TENSOR.ATTN_OUT, fill=0.0)]


def stand_in_ffn(n: int, hp: dict, name: Callable) -> list[TensorPlan]:
    """A block without an MLP: a zero FFN (SiLU(0) * 0 = 0, down-projected to 0)."""
    d = hp["n_embd"]
    return [TensorPlan(name(MODEL_TENSOR.FFN_NORM, n), STAND_IN, (d,), MODEL_TENSOR.FFN_NORM, fill=1.0),
            TensorPlan(name(MODEL_TENSOR.FFN_GATE, n), STAND_IN, (ZERO_FFN, d), MODEL_TENSOR.FFN_GATE, fill=0.0),
            TensorPlan(name(MODEL_TENSOR.FFN_UP, n), STAND_IN, (ZERO_FFN, d), MODEL_TENSOR.FFN_UP, fill=0.0),
            TensorPlan(name(MODEL_TENSOR.FFN_DOWN, n), STAND_IN, (d, ZERO_FFN), MODEL_TENSOR.FFN_DOWN, fill=0.0)]


def per_layer_metadata(items: list[MetaItem], written: tuple[BlockShape, ...], hp: dict,
                       key: Callable[[str], str]) -> list[MetaItem]:
    """The shared hparam keys with head counts and FFN widths as per-layer arrays, and the head
    size always written (llama.cpp would derive it from layer 0's head count)."""
    I32, U = GGUFValueType.INT32, GGUFValueType.UINT32
    A, L = Keys.Attention, Keys.LLM
    arrays = {key(A.HEAD_COUNT): [s.n_head for s in written], key(A.HEAD_COUNT_KV): [s.n_head_kv for s in written],
              key(L.FEED_FORWARD_LENGTH): [s.n_ff for s in written]}
    sizes = {key(A.KEY_LENGTH): hp["head_dim"], key(A.VALUE_LENGTH): hp["head_dim"]}
    out = []
    for item in items:
        if item.key in arrays:
            out.append(MetaItem(item.key, arrays[item.key], GGUFValueType.ARRAY, I32))
        elif item.key not in sizes:
            out.append(item)
    return out + [MetaItem(k, v, U) for k, v in sizes.items()]


def sub_block_provenance(shapes: tuple[BlockShape, ...]) -> list[MetaItem]:
    """``shortquant.*`` keys naming the written blocks whose attention / MLP the source removed."""
    out = []
    for k, blocks in ((keys.REMOVED_ATTENTION, [n for n, s in enumerate(shapes) if not s.n_head]),
                      (keys.REMOVED_MLP, [n for n, s in enumerate(shapes) if not s.n_ff])):
        if blocks:
            out.append(MetaItem(k, blocks, GGUFValueType.ARRAY, GGUFValueType.INT32))
    return out


# --- the DeciLM family ------------------------------------------------------------------------

def ffn_mult_to_width(ffn_mult: float, n_embd: int) -> int:
    """DeciLM's FFN width from ``ffn_mult``, as llama.cpp's converter computes it: 2/3 of
    ``ffn_mult * n_embd``, truncated, rounded up to a multiple of 256."""
    width = int(2 * ffn_mult * n_embd / 3)
    return -(-width // 256) * 256


def decilm_hparams(config: dict, path) -> dict:
    if not isinstance(config.get("block_configs"), list):
        raise ConfigError("DeciLMForCausalLM without a block_configs list is not supported", path)
    return llama_style_hparams({"intermediate_size": 1, **config}, path)


def decilm_shapes(config: dict, n_embd: int, n_head: int, folder) -> list[BlockShape]:
    """The shapes ``block_configs`` declares (the same reading as llama.cpp's converter)."""
    out = []
    for i, block in enumerate(config["block_configs"]):
        try:
            attn, ffn = block["attention"], block["ffn"]
            if ffn.get("replace_with_linear"):
                raise WeightError(f"block {i}: block_configs asks for a linear MLP, which llama.cpp cannot run",
                                  folder)
            group = None if attn.get("no_op") else attn.get("n_heads_in_group")
            if group is None:
                heads = (n_head, 0) if attn.get("replace_with_linear") and not attn.get("no_op") else (0, 0)
            else:
                heads = (n_head, n_head // int(group))
            mult = None if ffn.get("no_op") else ffn.get("ffn_mult")
            width = 0 if mult is None else ffn_mult_to_width(float(mult), n_embd)
        except (KeyError, TypeError, AttributeError, ValueError, ZeroDivisionError):
            raise WeightError(f"config.json: block_configs[{i}] is not a DeciLM block config", folder) from None
        out.append(BlockShape(*heads, width))
    return out


def check_block_configs(config: dict, hp: dict, shapes: tuple[BlockShape, ...], stored, folder) -> None:
    """``block_configs`` must describe exactly the blocks found."""
    declared = decilm_shapes(config, hp["n_embd"], hp["n_head"], folder)
    if len(declared) != len(shapes):
        raise WeightError(f"config.json: block_configs has {len(declared)} entries but the weights hold "
                          f"{len(shapes)} blocks", folder)
    for index, want, got in zip(stored, declared, shapes):
        if want != got:
            raise WeightError(f"block {index}: block_configs says {want.describe()} but its tensors hold "
                              f"{got.describe()}", folder)


DECILM = Family(
    name="decilm",
    architectures=("DeciLMForCausalLM",),
    model_types=("nemotron-nas", "deci"),
    arch=MODEL_ARCH.DECI,
    block_tensors=LLAMA_BLOCK,
    hparams=decilm_hparams,
    extra_tensors=llama3_rope_factors,
    extra_metadata=lambda hp, config, key: rope_scaling_metadata(config, key, ("linear", "yarn", "llama3")),
    optional_block_tensors={**LLAMA_OPTIONAL_BIASES, LINEAR_ATTN: (MODEL_TENSOR.ATTN_OUT, Transform.NONE)},
    per_layer_arch=MODEL_ARCH.DECI,
    check_block_shapes=check_block_configs,
)


# --- reading it back: the model card's per-block summary --------------------------------------

def block_summary(metadata: dict) -> list[str]:
    """Markdown lines summarising a ``deci`` file's blocks (runs of equal blocks merged), from its
    metadata; [] for other architectures."""
    if metadata.get("general.architecture") != "deci":
        return []
    heads, kv, ffn = (metadata.get(f"deci.{k}") for k in
                      ("attention.head_count", "attention.head_count_kv", "feed_forward_length"))
    if not all(isinstance(v, list) for v in (heads, kv, ffn)):
        return []
    no_attn = set(metadata.get(keys.REMOVED_ATTENTION) or [])
    no_mlp = set(metadata.get(keys.REMOVED_MLP) or [])
    rows = []
    for n, (h, k, f) in enumerate(zip(heads, kv, ffn)):
        attn = "removed" if n in no_attn else "linear" if not k else f"{h} heads, {k} KV heads"
        rows.append((attn, "removed" if n in no_mlp else f"{f} channels"))
    lines = ["## Block shapes", "",
             "Pruned within the blocks: written as llama.cpp's `deci` architecture, which reads each "
             "block's head counts and FFN width (`deci.attention.head_count`, `deci.attention.head_count_kv`, "
             "`deci.feed_forward_length`). Removed sub-blocks are listed in "
             f"`{keys.REMOVED_ATTENTION}` / `{keys.REMOVED_MLP}`.", "",
             "| Blocks | Attention | MLP |", "| --- | --- | --- |"]
    start = 0
    for n in range(1, len(rows) + 1):
        if n == len(rows) or rows[n] != rows[start]:
            span = f"{start}" if n - 1 == start else f"{start}-{n - 1}"
            lines.append(f"| {span} | {rows[start][0]} | {rows[start][1]} |")
            start = n
    return lines + [""]
