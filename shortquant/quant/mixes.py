"""Per-tensor type choice of llama.cpp's quantization mixes, written as data.

Each mix (``q4_k_m``, ``iq3_xxs``, ...) is a table: for every tensor *role* (attn_v, ffn_down,
output, ...) an ordered list of rules ``(type, condition)``; the first rule whose condition holds
picks the type, and a tensor with no matching rule gets the mix's default type. A few
*adjustments* apply after the choice (the 70B attn_v bump, 8-expert models). One small engine
(:func:`choose_types`) interprets the tables; the rules reproduce ``llama_tensor_get_type`` of
llama.cpp's ``src/llama-quant.cpp`` for dense LLaMA-family models, including its quirks:

* layer positions of attn_v / ffn_* come from counters that advance in llama.cpp's tensor order
  (by block, then by name), and only for tensors the mix logic actually visits;
* the "output" rules also cover ``token_embd`` when a model has no ``output.weight`` (tied);
* a row length that is not a multiple of the chosen type's block falls back to a 32-block type
  (Q4_K -> Q5_0, ...) or to F16.

Adding a custom mix is adding a table, not code.

>>> types = choose_types([("blk.0.attn_v.weight", (256, 256)), ("output.weight", (512, 256))],
...                      quant="q4_k_m", n_layer=1, n_head=8, n_head_kv=8)
>>> {k: v.name for k, v in types.items()}
{'blk.0.attn_v.weight': 'Q6_K', 'output.weight': 'Q6_K'}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ..errors import QuantError
from ..plan import FilePlan, ModelPlan
from .types import IMATRIX_REQUIRED_TYPES, QuantSpec, is_quantized, parse_quant, parse_tensor_type

# ---------------------------------------------------------------------------------------------
# Tensor roles (llama.cpp's "categories", found by substring in the GGUF tensor name)
# ---------------------------------------------------------------------------------------------

OUTPUT, TOKEN_EMBD, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUTPUT = (
    "output", "token_embd", "attn_v", "attn_k", "attn_q", "attn_output")
FFN_DOWN, FFN_GATE, FFN_UP, OTHER = "ffn_down", "ffn_gate", "ffn_up", "other"

# (role, exact name or None, substring or None) in llama.cpp's matching order; the fused QKV and
# MLA kv_b projections count as attn_v, as llama.cpp treats them.
_ROLE_MATCHERS: tuple[tuple[str, str | None, str | None], ...] = (
    (OUTPUT, "output.weight", None),
    (TOKEN_EMBD, "token_embd.weight", None),
    (TOKEN_EMBD, "per_layer_token_embd.weight", None),
    (ATTN_V, None, "attn_qkv.weight"),
    (ATTN_V, None, "attn_kv_b.weight"),
    (ATTN_V, None, "attn_v.weight"),
    (ATTN_K, None, "attn_k.weight"),
    (ATTN_Q, None, "attn_q.weight"),
    (ATTN_OUTPUT, None, "attn_output.weight"),
    (FFN_UP, None, "ffn_up"),
    (FFN_GATE, None, "ffn_gate"),
    (FFN_DOWN, None, "ffn_down"),
)

# Substrings of 2-D weights llama.cpp never quantizes (only those that can occur in dense
# LLaMA-family files; MoE routers included for completeness).
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "position_embd", "token_types")


def tensor_role(name: str) -> str:
    """The llama.cpp category of a GGUF tensor name.

    >>> tensor_role("blk.3.ffn_down.weight"), tensor_role("output.weight")
    ('ffn_down', 'output')
    """
    for role, exact, sub in _ROLE_MATCHERS:
        if (exact is not None and name == exact) or (sub is not None and sub in name):
            return role
    return OTHER


# ---------------------------------------------------------------------------------------------
# Conditions and rules
# ---------------------------------------------------------------------------------------------

# Named layer sets over (i, n) = (position of this tensor among its kind, how many there are).
LAYER_SETS = {
    "first_8th": lambda i, n: i < n // 8,
    "first_16th": lambda i, n: i < n // 16,
    "middle": lambda i, n: n // 8 <= i < 7 * n // 8,
    # llama.cpp's use_more_bits: first and last eighth, and every third layer between
    "more_bits": lambda i, n: i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2,
    "first_2": lambda i, n: i < 2,
    "first_4": lambda i, n: i < 4,
}


@dataclass(frozen=True)
class When:
    """A condition; every field that is set must hold (unset fields are ignored)."""

    layers: str | None = None          # a LAYER_SETS name
    gqa_at_least: int | None = None    # n_head // n_head_kv >= this
    imatrix: bool | None = None        # an importance matrix is given / not given
    expert8: bool | None = None        # the model has exactly 8 experts / not
    experts_at_least: int | None = None
    model_70b: bool | None = None      # llama.cpp's LLM_TYPE_70B (80 layers with GQA)
    row_not_multiple: bool | None = None  # row length not a multiple of the mix's default block

    def holds(self, ctx: "_Context", i: int, n: int) -> bool:
        return (
            (self.layers is None or LAYER_SETS[self.layers](i, n))
            and (self.gqa_at_least is None or ctx.n_gqa >= self.gqa_at_least)
            and (self.imatrix is None or ctx.has_imatrix == self.imatrix)
            and (self.expert8 is None or (ctx.n_expert == 8) == self.expert8)
            and (self.experts_at_least is None or ctx.n_expert >= self.experts_at_least)
            and (self.model_70b is None or ctx.model_70b == self.model_70b)
            and (self.row_not_multiple is None or ctx.row_not_multiple == self.row_not_multiple)
        )


ALWAYS = When()


@dataclass(frozen=True)
class Rule:
    """Give ``type`` when ``when`` holds (and, for adjustments, the type so far is in ``only_from``)."""

    type: T
    when: When = ALWAYS
    only_from: frozenset[T] | None = None


@dataclass(frozen=True)
class Mix:
    """One mix's table: rules per role (first match wins) and adjustments applied afterwards."""

    rules: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    adjust: dict[str, tuple[Rule, ...]] = field(default_factory=dict)


def R(qtype: T, **when) -> Rule:
    return Rule(qtype, When(**when))


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------

# Shared pieces: output (and tied token_embd) rules, and the attn_v adjustments of the "normal" mixes.
_OUT_Q6 = (R(T.Q8_0, row_not_multiple=True), R(T.Q6_K))
_OUT_Q5 = (R(T.Q8_0, row_not_multiple=True), R(T.Q5_K))
_OUT_KEEP = (R(T.Q8_0, row_not_multiple=True),)
_NORMAL_ADJUST = {
    ATTN_V: (
        Rule(T.Q5_K, When(model_70b=True), frozenset({T.Q3_K, T.Q4_K})),
        Rule(T.Q8_0, When(expert8=True)),
    ),
}
_ATTN_K_EXPERT8 = R(T.Q8_0, expert8=True)
# attn_output of 8-expert models: Q5_K for the mixes in this set, else untouched
_ATTN_OUT_EXPERT8_Q5K = {
    "q2_k", "iq3_xs", "iq3_xxs", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq3_s", "iq3_m", "iq4_xs",
}


def _normal(name: str, *, output=_OUT_Q6, **roles: tuple[Rule, ...]) -> Mix:
    """A mix of llama.cpp's main branch (everything but the IQ1/IQ2 mixes)."""
    rules = {OUTPUT: output, ATTN_K: (_ATTN_K_EXPERT8,) + roles.pop(ATTN_K, ())}
    attn_out = roles.pop(ATTN_OUTPUT, ())
    expert8 = (R(T.Q5_K, expert8=True),) if name in _ATTN_OUT_EXPERT8_Q5K else ()
    # with 8 experts, the non-expert attn_output rules never apply
    rules[ATTN_OUTPUT] = expert8 + tuple(Rule(r.type, When(**{**r.when.__dict__, "expert8": False}))
                                         for r in attn_out)
    rules.update(roles)
    return Mix(rules=rules, adjust=_NORMAL_ADJUST)


def _very_low(name: str, *, embd: T, v_small: T, down_first: T, attn_out: T | None) -> Mix:
    """A mix of llama.cpp's IQ1/IQ2 branch."""
    return Mix(rules={
        OUTPUT: _OUT_Q5,
        TOKEN_EMBD: (R(embd),),
        ATTN_V: (R(T.Q4_K, gqa_at_least=4), R(T.Q4_K, experts_at_least=4), R(v_small)),
        ATTN_K: (R(T.Q4_K, expert8=True),),
        FFN_DOWN: (R(down_first, layers="first_8th"),),
        ATTN_OUTPUT: (R(T.Q5_K, expert8=True),) + ((R(attn_out, expert8=False),) if attn_out else ()),
    })


MIXES: dict[str, Mix] = {
    "q4_0": _normal("q4_0", **{FFN_DOWN: (R(T.Q4_1, imatrix=True, layers="first_8th"),)}),
    "q4_1": _normal("q4_1"),
    "q5_0": _normal("q5_0", **{FFN_DOWN: (R(T.Q5_1, imatrix=True, layers="first_8th"),)}),
    "q5_1": _normal("q5_1"),
    "q8_0": _normal("q8_0", output=_OUT_KEEP),
    "q2_k": _normal("q2_k", **{
        ATTN_V: (R(T.Q4_K, gqa_at_least=4), R(T.Q3_K)),
        FFN_DOWN: (R(T.Q3_K),),
        ATTN_OUTPUT: (R(T.Q3_K),),
    }),
    "q2_k_s": _normal("q2_k_s", **{
        ATTN_V: (R(T.Q4_K, gqa_at_least=4),),
        FFN_DOWN: (R(T.Q4_K, layers="first_8th"),),
    }),
    "q3_k_s": _normal("q3_k_s"),
    "q3_k_m": _normal("q3_k_m", **{
        ATTN_V: (R(T.Q5_K, layers="first_2"), R(T.Q4_K)),
        FFN_DOWN: (R(T.Q5_K, layers="first_16th"), R(T.Q4_K)),
        ATTN_OUTPUT: (R(T.Q4_K),),
    }),
    "q3_k_l": _normal("q3_k_l", **{
        ATTN_V: (R(T.Q5_K),),
        FFN_DOWN: (R(T.Q5_K),),
        ATTN_OUTPUT: (R(T.Q5_K),),
    }),
    "q4_k_s": _normal("q4_k_s", **{
        ATTN_V: (R(T.Q5_K, layers="first_4"),),
        FFN_DOWN: (R(T.Q5_K, layers="first_8th"),),
    }),
    "q4_k_m": _normal("q4_k_m", **{
        ATTN_V: (R(T.Q6_K, layers="more_bits"),),
        FFN_DOWN: (R(T.Q6_K, layers="more_bits"),),
    }),
    "q5_k_s": _normal("q5_k_s"),
    "q5_k_m": _normal("q5_k_m", **{
        ATTN_V: (R(T.Q6_K, layers="more_bits"),),
        FFN_DOWN: (R(T.Q6_K, layers="more_bits"),),
    }),
    "q6_k": _normal("q6_k"),
    "iq4_nl": _normal("iq4_nl", **{
        ATTN_V: (R(T.Q5_K, gqa_at_least=4),),
        FFN_DOWN: (R(T.Q5_K, layers="first_8th", imatrix=False),),
    }),
    "iq4_xs": _normal("iq4_xs", **{
        ATTN_V: (R(T.Q5_K, gqa_at_least=4),),
        FFN_DOWN: (R(T.Q5_K, layers="first_8th", imatrix=False),),
    }),
    "iq3_s": _normal("iq3_s", **{ATTN_V: (R(T.Q4_K, gqa_at_least=4),)}),
    "iq3_m": _normal("iq3_m", **{
        ATTN_V: (R(T.Q4_K),),
        FFN_DOWN: (R(T.Q4_K, layers="first_8th"), R(T.Q4_K, layers="more_bits", expert8=True)),
        ATTN_OUTPUT: (R(T.Q4_K),),
    }),
    "iq3_xs": _normal("iq3_xs", **{
        ATTN_V: (R(T.Q4_K, gqa_at_least=4),),
        ATTN_K: (R(T.IQ3_XXS),),
        ATTN_Q: (R(T.IQ3_XXS),),
        FFN_GATE: (R(T.IQ3_XXS, layers="middle"),),
        FFN_UP: (R(T.IQ3_XXS, layers="middle"),),
    }),
    "iq3_xxs": _normal("iq3_xxs", **{
        TOKEN_EMBD: (R(T.IQ3_S),),
        ATTN_V: (R(T.Q4_K, gqa_at_least=4), R(T.IQ3_S, imatrix=False)),
        ATTN_K: (R(T.IQ2_S),),
        ATTN_Q: (R(T.IQ2_S),),
        FFN_DOWN: (R(T.Q4_K, imatrix=False, layers="first_8th"), R(T.Q3_K, imatrix=False)),
        ATTN_OUTPUT: (R(T.IQ3_S),),
    }, output=_OUT_Q5),
    "tq1_0": _normal("tq1_0", **{TOKEN_EMBD: (R(T.Q4_K),)}),
    "tq2_0": _normal("tq2_0", **{TOKEN_EMBD: (R(T.Q4_K),)}),
    "iq2_xxs": _very_low("iq2_xxs", embd=T.Q2_K, v_small=T.Q2_K, down_first=T.Q2_K, attn_out=None),
    "iq2_xs": _very_low("iq2_xs", embd=T.Q2_K, v_small=T.Q2_K, down_first=T.Q2_K, attn_out=None),
    "iq2_s": _very_low("iq2_s", embd=T.IQ3_S, v_small=T.IQ3_S, down_first=T.IQ3_S, attn_out=T.IQ3_S),
    "iq2_m": _very_low("iq2_m", embd=T.IQ3_S, v_small=T.IQ3_S, down_first=T.IQ3_S, attn_out=T.IQ3_S),
    "iq1_s": _very_low("iq1_s", embd=T.Q2_K, v_small=T.Q2_K, down_first=T.Q2_K, attn_out=T.IQ2_XXS),
    "iq1_m": _very_low("iq1_m", embd=T.Q2_K, v_small=T.Q2_K, down_first=T.Q2_K, attn_out=T.IQ2_XXS),
}

# The mixes whose layer counters for ffn_gate / ffn_up advance (llama.cpp's IQ1/IQ2 branch
# leaves them alone; harmless today since no rule there reads them, kept for fidelity).
_VERY_LOW = {"iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m"}

# Where a type whose block does not divide the row length falls back to (then F16 if still not).
FALLBACK: dict[T, T] = {
    **dict.fromkeys((T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS), T.IQ4_NL),
    **dict.fromkeys((T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0), T.Q4_0),
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantOverrides:
    """llama-quantize's manual choices.

    ``output_type`` / ``embedding_type``: ``--output-tensor-type`` / ``--token-embedding-type``;
    ``pure``: ``--pure`` (every quantizable weight gets the default type, no mix rules);
    ``tensor_types``: ``--tensor-type PATTERN=TYPE`` rules, the first whose regex is found in the
    tensor name wins (patterns are lower-cased, as llama-quantize does).

    >>> o = QuantOverrides.parse(tensor_types=["ffn_down=q6_k", r"blk\\.[0-3]\\..*=q8_0"])
    >>> [(p, t.name) for p, t in o.tensor_types]
    [('ffn_down', 'Q6_K'), ('blk\\\\.[0-3]\\\\..*', 'Q8_0')]
    """

    output_type: T | None = None
    embedding_type: T | None = None
    pure: bool = False
    tensor_types: tuple[tuple[str, T], ...] = ()

    @classmethod
    def parse(cls, *, output_type: str | None = None, embedding_type: str | None = None,
              pure: bool = False, tensor_types: Sequence[str] = ()) -> "QuantOverrides":
        """Build from command-line spellings (``"q8_0"``, ``"ffn_down=q6_k"``)."""
        rules = []
        for item in tensor_types:
            pattern, sep, type_name = item.rpartition("=")
            if not sep or not pattern or not type_name:
                raise QuantError(f"--tensor-type wants PATTERN=TYPE, got {item!r}")
            rules.append((pattern.lower(), parse_tensor_type(type_name)))
        return cls(
            output_type=parse_tensor_type(output_type) if output_type else None,
            embedding_type=parse_tensor_type(embedding_type) if embedding_type else None,
            pure=pure,
            tensor_types=tuple(rules),
        )

    def compiled(self) -> list[tuple[re.Pattern, T]]:
        out = []
        for pattern, qtype in self.tensor_types:
            try:
                out.append((re.compile(pattern), qtype))
            except re.error as exc:
                raise QuantError(f"bad --tensor-type pattern {pattern!r}: {exc}") from exc
        return out


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------

@dataclass
class _Context:
    spec: QuantSpec
    n_layer: int
    n_gqa: int
    n_expert: int
    has_imatrix: bool
    model_70b: bool
    row_not_multiple: bool = False


def _llama_order(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order: by block number (non-block tensors first), then by name."""
    m = re.match(r"blk\.(-?\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def _block_index(name: str, n_layer: int) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    if not m or not 0 <= int(m.group(1)) < n_layer:
        raise QuantError(f"cannot tell the layer of {name} (n_layer {n_layer})")
    return int(m.group(1))


def _allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and not any(s in name for s in _NEVER_QUANTIZED)


def _fallback(name: str, row: int, qtype: T) -> T:
    block = GGML_QUANT_SIZES[qtype][0]
    if row % block == 0:
        return qtype
    if qtype in FALLBACK:
        new = FALLBACK[qtype]
    elif block <= 32:
        new = qtype
    else:
        raise QuantError(f"{name}: row length {row} does not fit {qtype.name} and it has no fallback type")
    return new if row % GGML_QUANT_SIZES[new][0] == 0 else T.F16


def _first_match(rules: Sequence[Rule], ctx: _Context, i: int, n: int) -> T | None:
    for rule in rules:
        if rule.when.holds(ctx, i, n):
            return rule.type
    return None


def choose_types(
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    *,
    quant: str | QuantSpec,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    overrides: QuantOverrides | None = None,
    has_imatrix: bool = False,
    n_expert: int = 0,
    arch: str = "llama",
    mix: Mix | None = None,
    require_imatrix: bool = True,
) -> dict[str, T]:
    """The GGUF type of every tensor of a model quantized with ``quant``, as llama.cpp picks it.

    ``tensors``: (GGUF name, shape) in file order; shapes are numpy/torch order (rows, cols), so
    ``shape[-1]`` is the row length. Tensors llama.cpp never quantizes (1-D, norms) stay F32.
    ``mix`` replaces the built-in table of ``quant`` (custom mixes). Raises QuantError when the
    choice needs an importance matrix and ``has_imatrix`` is False, unless ``require_imatrix``
    is False (planning / dry runs). ``n_expert`` and ``arch`` matter only for MoE and 80-layer
    models (llama.cpp's 70B rule).

    >>> t = choose_types([("token_embd.weight", (32000, 4096)), ("blk.0.attn_norm.weight", (4096,))],
    ...                  quant="q8_0", n_layer=32, n_head=32, n_head_kv=32)
    >>> t["token_embd.weight"].name, t["blk.0.attn_norm.weight"].name
    ('Q8_0', 'F32')
    """
    spec = quant if isinstance(quant, QuantSpec) else parse_quant(quant)
    overrides = overrides or QuantOverrides()
    patterns = overrides.compiled()
    table = mix if mix is not None else MIXES.get(spec.name, Mix())
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    ctx = _Context(
        spec=spec, n_layer=n_layer, n_gqa=n_gqa, n_expert=n_expert, has_imatrix=has_imatrix,
        model_70b=n_layer == 80 and (arch == "deci" or (arch == "llama" and n_head != n_head_kv)),
    )
    roles = {name: tensor_role(name) for name, _ in tensors}
    tied = OUTPUT not in roles.values()
    n_attn_v = sum(role == ATTN_V for role in roles.values())
    counters = {ATTN_V: 0, FFN_DOWN: 0, FFN_GATE: 0, FFN_UP: 0}
    default = spec.default_type

    result: dict[str, T] = {}
    for name, shape in sorted(tensors, key=lambda t: _llama_order(t[0])):
        shape = tuple(int(s) for s in shape)
        role = roles[name]
        if not _allows_quantization(name, shape):
            result[name] = T.F32
            continue
        if overrides.embedding_type is not None and role == TOKEN_EMBD:
            result[name] = overrides.embedding_type
            continue
        if overrides.output_type is not None and role == OUTPUT:
            result[name] = overrides.output_type
            continue
        qtype = default
        if is_quantized(default):
            manual = next((t for p, t in patterns if p.search(name)), None)
            if manual is not None:
                qtype = manual
            elif not overrides.pure:
                qtype = _mix_type(table, ctx, role, name, shape, tied, n_attn_v, counters, overrides)
            qtype = _fallback(name, shape[-1], qtype)
        result[name] = qtype

    if require_imatrix and not has_imatrix:
        for name, qtype in result.items():
            if roles[name] not in (OUTPUT, TOKEN_EMBD) and (
                qtype in IMATRIX_REQUIRED_TYPES
                or (qtype == T.Q2_K and spec.name == "q2_k_s")
            ):
                raise QuantError(
                    f"{spec.name} quantizes {name} to {qtype.name}, which needs an importance matrix; "
                    "make one with `shortquant imatrix MODEL --text calib.txt -o imatrix.gguf` "
                    "and pass it with --imatrix"
                )
    return {name: result[name] for name, _ in tensors}


def _mix_type(table: Mix, ctx: _Context, role: str, name: str, shape: tuple[int, ...], tied: bool,
              n_attn_v: int, counters: dict[str, int], overrides: QuantOverrides) -> T:
    """One tensor through the mix table (llama_tensor_get_type_impl), advancing the counters."""
    default = ctx.spec.default_type
    if role == OUTPUT or (tied and role == TOKEN_EMBD):
        if overrides.output_type is not None:
            return overrides.output_type
        ctx.row_not_multiple = shape[-1] % GGML_QUANT_SIZES[default][0] != 0
        chosen = _first_match(table.rules.get(OUTPUT, ()), ctx, 0, 0)
        ctx.row_not_multiple = False
        return chosen or default
    if role == TOKEN_EMBD:
        return _first_match(table.rules.get(TOKEN_EMBD, ()), ctx, 0, 0) or default

    # position of this tensor among its kind: attn_v counts attn_v tensors; ffn_* count blocks
    i, n = 0, 0
    if role == ATTN_V:
        i, n = counters[ATTN_V], n_attn_v
    elif role in (FFN_DOWN, FFN_GATE, FFN_UP):
        i, n = counters[role], ctx.n_layer
        if ctx.n_expert > 1:  # expert tensors are not in block order; read the block from the name
            i = _block_index(name, ctx.n_layer)
    chosen = _first_match(table.rules.get(role, ()), ctx, i, n) or default
    for rule in table.adjust.get(role, ()):
        if (rule.only_from is None or chosen in rule.only_from) and rule.when.holds(ctx, i, n):
            chosen = rule.type
    if role in (ATTN_V, FFN_DOWN) or (role in (FFN_GATE, FFN_UP) and ctx.spec.name not in _VERY_LOW):
        counters[role] += 1
    return chosen


def plan_file(plan: ModelPlan, quant, out_dir: Path, overrides=None, has_imatrix: bool = False,
              require_imatrix: bool = True) -> FilePlan:
    """Choose every tensor's type for one output type and name the file.

    ``require_imatrix=False`` plans a type that needs an importance matrix without one
    (to show the plan; writing it still needs the imatrix).

    >>> from shortquant.export import ExportOptions, make_model_plan
    >>> from shortquant.recipes import load_recipe
    >>> from shortquant.resources import demo_model
    >>> from shortquant.source.checkpoint import open_checkpoint
    >>> options = ExportOptions(recipe=load_recipe("shortquant-demo"))
    >>> plan = make_model_plan(open_checkpoint(demo_model()), options)
    >>> plan_file(plan, "q4_k_m", Path("gguf")).path.name
    'Shortquant-Demo-5.0M-stories-Q4_K_M.gguf'
    """
    spec = quant if not isinstance(quant, str) else parse_quant(quant)
    hp = plan.hparams
    types = choose_types([(t.name, t.shape) for t in plan.tensors], quant=spec, n_layer=hp["n_layer"],
                         n_head=hp["n_head"], n_head_kv=hp["n_head_kv"], n_expert=hp.get("n_expert", 0),
                         overrides=overrides, has_imatrix=has_imatrix, arch=plan.arch,
                         require_imatrix=require_imatrix)
    return FilePlan(quant=spec.name, type_label=spec.label, file_type=spec.file_type, tensor_types=types,
                    path=Path(out_dir) / plan.naming.file_name(spec.label))
