"""User-facing quantization names (llama.cpp's, e.g. ``q4_k_m``) and what they mean.

A *quant* is a llama.cpp file type: a mix name such as ``q4_k_m`` that stands for a GGUF
``general.file_type`` and a default tensor type (``Q4_K``); the per-tensor choices of a mix live
in :mod:`shortquant.quant.mixes`.

>>> spec = parse_quant("Q4_K_M")
>>> spec.name, spec.file_type.name, spec.default_type.name
('q4_k_m', 'MOSTLY_Q4_K_M', 'Q4_K')
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from ..errors import QuantError
from ..suggest import unknown_name


@dataclass(frozen=True)
class QuantSpec:
    """One llama.cpp quantization choice: its name, GGUF file type and default tensor type."""

    name: str
    file_type: F
    default_type: T

    @property
    def label(self) -> str:
        """The spelling used in file names and llama.cpp's logs, e.g. ``Q4_K_M``."""
        return self.name.upper()


# name -> (file type, default tensor type); the order is llama-quantize's, largest first
# within each family, and is the order ``all`` expands to.
_TABLE: dict[str, tuple[F, T]] = {
    "f32": (F.ALL_F32, T.F32),
    "f16": (F.MOSTLY_F16, T.F16),
    "bf16": (F.MOSTLY_BF16, T.BF16),
    "q8_0": (F.MOSTLY_Q8_0, T.Q8_0),
    "q6_k": (F.MOSTLY_Q6_K, T.Q6_K),
    "q5_k_m": (F.MOSTLY_Q5_K_M, T.Q5_K),
    "q5_k_s": (F.MOSTLY_Q5_K_S, T.Q5_K),
    "q5_1": (F.MOSTLY_Q5_1, T.Q5_1),
    "q5_0": (F.MOSTLY_Q5_0, T.Q5_0),
    "q4_k_m": (F.MOSTLY_Q4_K_M, T.Q4_K),
    "q4_k_s": (F.MOSTLY_Q4_K_S, T.Q4_K),
    "q4_1": (F.MOSTLY_Q4_1, T.Q4_1),
    "q4_0": (F.MOSTLY_Q4_0, T.Q4_0),
    "iq4_nl": (F.MOSTLY_IQ4_NL, T.IQ4_NL),
    "iq4_xs": (F.MOSTLY_IQ4_XS, T.IQ4_XS),
    "q3_k_l": (F.MOSTLY_Q3_K_L, T.Q3_K),
    "q3_k_m": (F.MOSTLY_Q3_K_M, T.Q3_K),
    "q3_k_s": (F.MOSTLY_Q3_K_S, T.Q3_K),
    "iq3_m": (F.MOSTLY_IQ3_M, T.IQ3_S),
    "iq3_s": (F.MOSTLY_IQ3_S, T.IQ3_S),
    "iq3_xs": (F.MOSTLY_IQ3_XS, T.IQ3_S),
    "iq3_xxs": (F.MOSTLY_IQ3_XXS, T.IQ3_XXS),
    "q2_k": (F.MOSTLY_Q2_K, T.Q2_K),
    "q2_k_s": (F.MOSTLY_Q2_K_S, T.Q2_K),
    "iq2_m": (F.MOSTLY_IQ2_M, T.IQ2_S),
    "iq2_s": (F.MOSTLY_IQ2_S, T.IQ2_XS),
    "iq2_xs": (F.MOSTLY_IQ2_XS, T.IQ2_XS),
    "iq2_xxs": (F.MOSTLY_IQ2_XXS, T.IQ2_XXS),
    "iq1_m": (F.MOSTLY_IQ1_M, T.IQ1_M),
    "iq1_s": (F.MOSTLY_IQ1_S, T.IQ1_S),
    "tq2_0": (F.MOSTLY_TQ2_0, T.TQ2_0),
    "tq1_0": (F.MOSTLY_TQ1_0, T.TQ1_0),
}

QUANT_NAMES: tuple[str, ...] = tuple(_TABLE)
"""Every accepted quant name, in llama-quantize's order."""

TERNARY_NAMES: tuple[str, ...] = ("tq2_0", "tq1_0")
"""Ternary types: lossless only for models trained ternary (BitNet b1.58); on any other model
they destroy most of the quality (mean KLD 0.54 on the demo model), so ``all`` leaves them out.
shortquant converts LLaMA-family checkpoints, which are never trained ternary, so ``all`` never
includes them; they stay available by name."""

ALL_NAMES: tuple[str, ...] = tuple(n for n in QUANT_NAMES if n not in TERNARY_NAMES)
"""What ``all`` expands to: every type but the ternary ones, in llama-quantize's order."""

# Tensor types whose ggml kernels give garbage without an importance matrix (llama.cpp refuses them).
IMATRIX_REQUIRED_TYPES: frozenset[T] = frozenset(
    {T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S}
)

# Tensor type names accepted in overrides (``--tensor-type ffn_down=q6_k``): ggml's names.
_TENSOR_TYPES: dict[str, T] = {
    t.name.lower(): t
    for t in T
    if t not in (T.Q8_1, T.Q8_K, T.I8, T.I16, T.I32, T.I64, T.F64)
}


def parse_quant(name: str) -> QuantSpec:
    """The quant named ``name`` (case-insensitive, llama.cpp's spelling).

    >>> parse_quant("iq4_xs").default_type.name
    'IQ4_XS'
    """
    key = name.strip().lower()
    if key not in _TABLE:
        raise QuantError(unknown_name("quantization type", name, (*QUANT_NAMES, "all")))
    file_type, default_type = _TABLE[key]
    return QuantSpec(key, file_type, default_type)


def parse_quants(names: list[str] | tuple[str, ...]) -> list[QuantSpec]:
    """Several quant names, ``all`` expanding to every non-ternary one; duplicates dropped, order kept.

    >>> [q.name for q in parse_quants(["q8_0", "Q8_0", "q4_k_m"])]
    ['q8_0', 'q4_k_m']
    >>> "tq1_0" in [q.name for q in parse_quants(["all"])], [q.name for q in parse_quants(["all", "tq1_0"])][-1]
    (False, 'tq1_0')
    """
    out: dict[str, QuantSpec] = {}
    for name in names:
        specs = [parse_quant(n) for n in ALL_NAMES] if name.strip().lower() == "all" else [parse_quant(name)]
        for spec in specs:
            out.setdefault(spec.name, spec)
    return list(out.values())


def parse_tensor_type(name: str) -> T:
    """A single ggml tensor type by name (``q6_k``, ``Q8_0``, ``f16``), for overrides.

    >>> parse_tensor_type("Q6_K").name
    'Q6_K'
    """
    key = name.strip().lower()
    if key not in _TENSOR_TYPES:
        raise QuantError(unknown_name("tensor type", name, _TENSOR_TYPES))
    return _TENSOR_TYPES[key]


def is_quantized(qtype: T) -> bool:
    """True for block-quantized types (everything but F32/F16/BF16 and integer types)."""
    return qtype not in (T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64)


def file_type_requires_imatrix(spec: QuantSpec) -> bool:
    """True when llama.cpp would refuse this quant without an importance matrix."""
    return spec.default_type in IMATRIX_REQUIRED_TYPES or spec.file_type == F.MOSTLY_Q2_K_S


def requires_imatrix(qtype: T) -> bool:
    """True when llama.cpp refuses to quantize a weight to ``qtype`` without an importance matrix.

    This is llama.cpp's policy (IQ1/IQ2 types and IQ3_XXS), wider than the kernel's own check.
    llama.cpp exempts the token embedding and output tensors; so does the mix engine.

    >>> import gguf; requires_imatrix(gguf.GGMLQuantizationType.IQ3_XXS)
    True
    """
    from ..ggml import kernel_requires_imatrix

    return qtype in IMATRIX_REQUIRED_TYPES or kernel_requires_imatrix(qtype)
