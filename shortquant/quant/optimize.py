"""Optimized type mixes: measured, solved under an exact byte budget, verified.

``export -q q4_k_m --optimize --calib calib.txt`` (or ``--target-bpw`` / ``--target-size``):

1. **measure**: every quantizable tensor is quantized and decoded by ggml for every candidate
   type (:mod:`shortquant.quant.sensitivity`), its error weighted by the calibration activations;
2. **probe**: for the embedding, the output, the blocks next to removed blocks and a sample of
   the others, one decoded tensor is swapped into the Hugging Face model and the KL divergence on
   calibration tokens measured (:mod:`shortquant.quant.probe`; only the blocks from the
   tensor's own onwards are rerun); KLD / error is that tensor's sensitivity, and unprobed
   tensors take the median of probed tensors of the same kind;
3. **solve**: one type per tensor, least predicted KLD, with the whole file (header, metadata,
   padding) within the budget, counted by planning the file (:mod:`shortquant.quant.solver`);
4. **verify**: the chosen mix and the standard one are both decoded into the model and measured
   on calibration chunks the probes did not use; the optimized file is written only when it
   measures better, else the standard mix is written and a note says so. Either is written from
   the encodings the verification measured (:class:`MixVerifier`), not quantized again.

The result is a :class:`FilePlan` like any other: the chosen types are fed through
``choose_types`` as exact ``--tensor-type`` overrides, and the writer adds ``shortquant.optimize.*``
metadata. Several targets share one measurement (a ladder: ``-q q3_k_m -q q4_k_m --optimize``,
``--target-bpw 3,4,5``): the candidate types do not depend on which targets were asked for, so
every file of a ladder is byte-identical to the file a run for that target alone writes.
``--optimize-keep token_embd,output`` holds those tensors at each target's standard-mix type and
spends the budget on the others (what the blocks alone gain; they are not probed).
``--json`` reports each stage's seconds and the process's peak RSS at its end
(:func:`shortquant.system.peak_rss`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType

from .. import keys
from ..errors import QuantError
from ..plan import FilePlan, MetaItem, ModelPlan, TensorPlan
from .mixes import (ATTN_K, ATTN_OUTPUT, ATTN_Q, ATTN_V, FFN_DOWN, FFN_GATE, FFN_UP, OUTPUT, TOKEN_EMBD,
                    QuantOverrides, plan_file, tensor_role)
from .sensitivity import candidate_types, tensor_errors
from .solver import BudgetTooSmall, Option, solve
from .types import QuantSpec, is_quantized, parse_quant

# Standard mixes a --target-bpw / --target-size file is compared with (the largest that fits).
REFERENCE_MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "q8_0")
# Tensor kinds ``--optimize-keep`` can hold at the standard mix's type.
KEEP_KINDS = (TOKEN_EMBD, OUTPUT, ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT, FFN_GATE, FFN_UP, FFN_DOWN)
# Tensors larger than this many values are measured on evenly spaced rows (rows quantize
# independently, so the sum over a row sample, scaled, estimates the whole); half as many
# beyond BIG_PARAMS (big_model_defaults): 128 rows of a 4096-wide tensor.
SAMPLE_VALUES = 1 << 20


@dataclass(frozen=True)
class OptimizeSettings:
    calib: Path
    ctx: int = 256
    probe_chunks: int | None = None   # calibration chunks the probes measure KLD on [by model size]
    verify_chunks: int | None = None   # further chunks the verification measures on [by model size]
    sample_values: int | None = None   # values a tensor's errors are measured on [by model size]
    max_probe_blocks: int = 8    # blocks probed tensor by tensor (cut neighbours first)
    split_kinds: bool | None = None   # sampled blocks probe half the kinds each [by model size]
    probe_ctx: int | None = None   # tokens of each probe chunk [by model size: big_model_defaults]
    probe_from: str = "auto"     # the probed model's blocks: memory, disk (streamed), auto (probe.probe_from)
    threads: int | None = None
    quiet: bool = False
    base_metadata: tuple[MetaItem, ...] = ()   # what export adds to every file (counted in budgets)
    overrides: QuantOverrides | None = None    # the user's --tensor-type & co: kept as given
    keep: tuple[str, ...] = ()   # tensor kinds held at each target's standard-mix type (--optimize-keep)


@dataclass(frozen=True)
class OptimizeRequest:
    """What ``export`` was asked to optimize (``ExportOptions.optimize``).

    ``optimize``: every quantized ``--quant`` becomes its optimized variant, within the
    standard mix's own file size; ``target_bpw`` (one value or several) / ``target_size``: one
    more file within each budget (bits per weight over all parameters, or whole-file bytes).
    ``keep``: tensor kinds (:data:`KEEP_KINDS`) every file holds at its standard mix's type, so
    the budget is spent on the other tensors only (:func:`parse_keep`).
    """

    calib: Path
    optimize: bool = False
    target_bpw: float | tuple[float, ...] | None = None
    target_size: int | None = None
    ctx: int = 256
    probe_chunks: int | None = None
    verify_chunks: int | None = None
    max_probe_blocks: int = 8
    probe_from: str = "auto"
    keep: tuple[str, ...] = ()


def run_optimizer(checkpoint, plan: ModelPlan, files: Sequence[FilePlan], options, importance: dict,
                  base_metadata: Sequence[MetaItem] = ()) -> tuple[list[FilePlan], list["Outcome"]]:
    """``export``'s optimization step: the file plans to write and what each target gave."""
    request: OptimizeRequest = options.optimize
    if options.overrides is not None and getattr(options.overrides, "pure", False):
        raise QuantError("--optimize and --pure contradict each other (--pure fixes every type)")
    if plan.hparams.get("n_expert"):
        raise QuantError("--optimize does not handle mixture-of-experts models yet (its probes rerun dense "
                         "blocks); use a standard mix")
    has_imatrix = options.imatrix is not None
    targets = make_targets(plan, files, optimize=request.optimize, target_bpw=request.target_bpw,
                           target_size=request.target_size, out_dir=options.out_dir,
                           overrides=options.overrides, has_imatrix=has_imatrix, base=base_metadata)
    if not targets:
        return list(files), []
    settings = OptimizeSettings(calib=request.calib, ctx=request.ctx, probe_chunks=request.probe_chunks,
                                verify_chunks=request.verify_chunks, max_probe_blocks=request.max_probe_blocks,
                                probe_from=request.probe_from, threads=options.threads, quiet=options.quiet,
                                base_metadata=tuple(base_metadata), overrides=options.overrides,
                                keep=tuple(request.keep))
    return optimize_files(checkpoint, plan, files, targets, settings, importance, options.out_dir, has_imatrix)


@dataclass(frozen=True)
class Target:
    """One optimized file: a budget in whole-file bytes and the standard mix it must beat."""

    key: str                      # FilePlan.quant, e.g. "q4_k_m-opt"
    label: str                    # file-name type label, e.g. "Q4_K_M_OPT"
    budget: int
    reference: FilePlan | None    # None: no standard mix fits the budget
    spec: QuantSpec               # file type (the reference's, else q2_k's)


@dataclass(frozen=True)
class OptimizedFilePlan(FilePlan):
    """A FilePlan whose writer adds ``extra_metadata`` (the optimizer's record)."""

    extra_metadata: tuple[MetaItem, ...] = ()


@dataclass
class Measurement:
    """What the model told us: errors per tensor and type, sensitivities, probes."""

    errors: dict[str, dict[T, float]]
    coef: dict[str, float]                 # predicted KLD per unit of weighted error
    probes: dict[str, tuple[T, float]]     # probed tensor -> (type, measured KLD)
    fixed: dict[str, T]                    # tensors that are not quantized (norms) and their type
    seconds: dict[str, float] = field(default_factory=dict)   # "errors", "probes"


@dataclass
class Outcome:
    """One target's result, for notes, metadata and the benchmark."""

    target: Target
    file: FilePlan
    optimized: bool
    kld: float | None = None            # calibration KLD of the optimized mix
    kld_reference: float | None = None  # and of the standard mix
    predicted: float = 0.0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)
    encoded: dict = field(default_factory=dict, repr=False)   # for the writer: name -> StoredRows
    seconds: dict[str, float] = field(default_factory=dict)   # the whole run's, by stage
    peak_rss: dict[str, int] = field(default_factory=dict)    # process peak RSS (bytes) at each stage's end
    probe_from: str = ""   # where the probed model's blocks were: "memory" or "disk"

    def as_dict(self) -> dict:
        """For ``export --json``."""
        ref = self.target.reference
        return {"target": self.target.label, "budget": self.target.budget, "written": self.file.type_label,
                "optimized": self.optimized, "bytes": self.bytes, "base_mix": ref.quant if ref else None,
                "kld_calibration": self.kld, "kld_calibration_base_mix": self.kld_reference,
                "kld_predicted": self.predicted, "notes": self.notes,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                "peak_rss_mb": {k: round(v / 2**20) for k, v in self.peak_rss.items()},
                "probe_from": self.probe_from}


# -- budgets, counted by planning the file ------------------------------------------------------
def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def alignment(plan: ModelPlan) -> int:
    import gguf

    return next((int(m.value) for m in plan.metadata if m.key == gguf.Keys.General.ALIGNMENT),
                gguf.GGUF_DEFAULT_ALIGNMENT)


def file_bytes(plan: ModelPlan, file_plan: FilePlan, extra: Sequence[MetaItem] | None = None,
               base: Sequence[MetaItem] = ()) -> int:
    """The exact size of the GGUF file ``file_plan`` describes (header, metadata, padding),
    as the writer itself plans it. ``base``: the metadata export adds to every file;
    ``extra``: this file's own (default: what an OptimizedFilePlan carries)."""
    from ..gguf_out import GGUFFileWriter

    if extra is None:
        extra = getattr(file_plan, "extra_metadata", ())
    bare = FilePlan(quant=file_plan.quant, type_label=file_plan.type_label, file_type=file_plan.file_type,
                    tensor_types=file_plan.tensor_types, path=file_plan.path)
    return GGUFFileWriter(plan, bare, tuple(base) + tuple(extra)).planned_size()


def parse_target_bpw(text) -> tuple[float, ...]:
    """Bits per weight in ``4.5`` or a comma list ``2.5,3,4`` (a ladder, measured once); a jobs
    file may give a number or a list of numbers.

    >>> parse_target_bpw("2.5, 3,4")
    (2.5, 3.0, 4.0)
    """
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        values = tuple(float(v) for v in items)
    except ValueError:
        raise QuantError(f"--target-bpw wants bits per weight like 4.5 or 3,4,5, got {text!r}") from None
    for v in values:
        if not 0 < v <= 32:
            raise QuantError(f"--target-bpw must be between 0 and 32 bits per weight, got {v:g}")
    if len(set(values)) != len(values):
        raise QuantError(f"--target-bpw lists a value twice: {text!r}")
    return values


def parse_keep(text) -> tuple[str, ...]:
    """Tensor kinds for ``--optimize-keep``: ``token_embd,output`` (a jobs file may give a list).

    >>> parse_keep("token_embd, output")
    ('token_embd', 'output')
    """
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    kinds = tuple(str(k).strip() for k in items if str(k).strip())
    for kind in kinds:
        if kind not in KEEP_KINDS:
            raise QuantError(f"--optimize-keep: unknown tensor kind {kind!r} (one of {', '.join(KEEP_KINDS)})")
    if not kinds:
        raise QuantError("--optimize-keep wants tensor kinds like token_embd,output")
    return tuple(dict.fromkeys(kinds))


def kept_tensors(plan: ModelPlan, kinds: Sequence[str]) -> set[str]:
    """The tensors of ``kinds``. With a tied embedding (no output.weight) the token embedding
    is the output too, so ``output`` keeps it."""
    tied = not any(tensor_role(t.name) == OUTPUT for t in plan.tensors)
    wanted = set(kinds) | ({TOKEN_EMBD} if tied and OUTPUT in kinds else set())
    return {t.name for t in plan.tensors if tensor_role(t.name) in wanted}


def make_targets(plan: ModelPlan, files: Sequence[FilePlan], *, optimize: bool, target_bpw: float | None,
                 target_size: int | None, out_dir: Path, overrides=None, has_imatrix: bool = False,
                 base: Sequence[MetaItem] = ()) -> list[Target]:
    """The optimized files to make: one per quantized file of ``files`` (with ``optimize``),
    plus one for each bpw target and for a size target."""
    targets = []
    if optimize:
        for f in files:
            spec = parse_quant(f.quant)
            if not is_quantized(spec.default_type):
                continue
            label = spec.label + keys.OPT_SUFFIX
            targets.append(Target(f"{spec.name}-opt", label, file_bytes(plan, f, base=base), f, spec))
    bpws = () if target_bpw is None else (target_bpw,) if isinstance(target_bpw, (int, float)) else target_bpw
    for value, what in [*((v, "bpw") for v in bpws), (target_size, "size")]:
        if value is None:
            continue
        if what == "bpw":
            if not 0 < value <= 32:
                raise QuantError(f"--target-bpw must be between 0 and 32 bits per weight, got {value}")
            budget = int(math.floor(value * plan.n_params / 8))
            label = f"BPW{value:.2f}".replace(".", "_") + keys.OPT_SUFFIX
        else:
            budget = int(value)
            label = f"SIZE{_size_label(budget)}{keys.OPT_SUFFIX}"
        reference = None
        for name in REFERENCE_MIXES:
            fp = plan_file(plan, name, out_dir, overrides, has_imatrix)
            if file_bytes(plan, fp, base=base) <= budget:
                reference = fp
        spec = parse_quant(reference.quant if reference is not None else "q2_k")
        targets.append(Target(label.lower(), label, budget, reference, spec))
    return targets


def _size_label(n: int) -> str:
    for unit, scale in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}".rstrip("0").rstrip(".").replace(".", "_") + unit
    return str(n)


# -- measurement ------------------------------------------------------------------------------------
def block_of(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def cut_distance(plan: ModelPlan) -> dict[int, int | None]:
    """For every written block, how many original positions away the nearest removed block is
    (1: right next to a cut); None when the pruning is not known."""
    bm = plan.block_map
    removed = bm.removed
    out = {}
    for n in range(bm.block_count):
        if not removed or bm.original is None:
            out[n] = None
        else:
            out[n] = min(abs(bm.original[n] - r) for r in removed)
    return out


def probe_blocks(plan: ModelPlan, max_blocks: int) -> list[int]:
    """Blocks probed tensor by tensor: those next to a cut, the first and last, then evenly
    spaced others, up to ``max_blocks`` (cut neighbours are never dropped)."""
    n = plan.block_map.block_count
    dist = cut_distance(plan)
    chosen = [b for b in range(n) if dist[b] == 1]
    for b in (0, n - 1):
        if b not in chosen:
            chosen.append(b)
    k = 1
    while len(chosen) < min(max_blocks, n):
        step = (n - 1) / (k + 1)
        for j in range(1, k + 1):
            b = int(round(j * step))
            if b not in chosen and len(chosen) < min(max_blocks, n):
                chosen.append(b)
        k += 1
    return sorted(set(chosen))


BLOCK_KINDS = (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT, FFN_GATE, FFN_UP, FFN_DOWN)


def probe_plan(plan: ModelPlan, max_blocks: int, split_kinds: bool) -> dict[int, frozenset[str] | None]:
    """The probed blocks (:func:`probe_blocks`) and the tensor kinds probed in each (None: all).
    With ``split_kinds`` the evenly spaced sample blocks alternate between two halves of the
    kinds, while cut neighbours and the first and last block keep all: every kind is still
    probed at both ends and across the depth, with 40 % fewer probes on an uncut model."""
    n = plan.block_map.block_count
    dist = cut_distance(plan)
    out, sampled = {}, 0
    for b in probe_blocks(plan, max_blocks):
        if not split_kinds or dist[b] == 1 or b in (0, n - 1):
            out[b] = None
        else:
            out[b] = frozenset(BLOCK_KINDS[sampled % 2::2])
            sampled += 1
    return out


def _probed(name: str, plan_of_probes: dict[int, frozenset[str] | None]) -> bool:
    block = block_of(name)
    if block is None:
        return tensor_role(name) in (OUTPUT, TOKEN_EMBD)
    if block not in plan_of_probes:
        return False
    kinds = plan_of_probes[block]
    return kinds is None or tensor_role(name) in kinds or tensor_role(name) not in BLOCK_KINDS


def _group(name: str, dist: dict[int, int | None]) -> tuple[str, bool]:
    block = block_of(name)
    return tensor_role(name), (block is not None and dist.get(block) == 1)


def _probe_type(cands: Sequence[T]) -> T:
    # a type low enough that one tensor's change is well above float noise, common enough to
    # be realistic: Q3_K for K-type rows, else the smallest 32-block type
    return T.Q3_K if T.Q3_K in cands else cands[0]


def measure(checkpoint, plan: ModelPlan, prober, importance: dict, settings: OptimizeSettings,
            extra_types: dict[str, set[T]], has_imatrix: bool) -> Measurement:
    """Errors of every candidate type of every tensor, and each tensor's sensitivity."""
    from tqdm import tqdm

    from ..stream import Piece, load_piece

    fixed_plan = plan_file(plan, "q8_0", Path("."), require_imatrix=False)
    dist = cut_distance(plan)
    which = probe_plan(plan, settings.max_probe_blocks, bool(settings.split_kinds))
    kept = kept_tensors(plan, settings.keep)   # their type is the standard mix's: no probe needed
    errors, probes, fixed, raw_coef = {}, {}, {}, {}
    user = user_choices(plan, settings.overrides, has_imatrix)
    quantizable = [t for t in plan.tensors
                   if is_quantized(fixed_plan.tensor_types[t.name]) and not t.computed and t.name not in user]
    for t in plan.tensors:
        if t.name in user:
            fixed[t.name] = user[t.name]
        elif t.computed and is_quantized(fixed_plan.tensor_types[t.name]):
            # deci's zero stand-ins: exact in any type, so the smallest
            fixed[t.name] = candidate_types(t.shape, has_imatrix=has_imatrix)[0]
        elif t not in quantizable:
            fixed[t.name] = fixed_plan.tensor_types[t.name]
    seconds = {"errors": 0.0, "probes": 0.0}
    probed: list[tuple[TensorPlan, T]] = []
    limit = settings.sample_values or SAMPLE_VALUES
    for t in tqdm(quantizable, desc="measure types", unit="tensor", disable=settings.quiet, leave=False):
        tick = time.perf_counter()
        role = tensor_role(t.name)
        special = role in (OUTPUT, TOKEN_EMBD)
        cands = candidate_types(t.shape, has_imatrix=has_imatrix, extra=extra_types.get(t.name, ()),
                                embedding_or_output=special)
        data = load_piece(checkpoint, Piece(t, 0, t.shape[0]))
        if role == TOKEN_EMBD:   # a row matters as often as its token occurs
            rows, row_w, scale = _sample_token_rows(prober.token_counts[: t.shape[0]], t.shape[-1], limit)
            col_w = None
        else:
            rows, row_w = _sample_rows(t, limit), None
            col_w = _columns(prober.column_weights(t.source), t.shape[-1])
            scale = 1.0 if rows is None else t.shape[0] / len(rows)
        sample = data if rows is None else data[rows]
        errs = tensor_errors(sample, cands, importance.get(t.name), col_w, row_w, settings.threads)
        errors[t.name] = {q: e * scale for q, e in errs.items()}
        if _probed(t.name, which) and t.name not in kept:
            probed.append((t, _probe_type(cands)))
        seconds["errors"] += time.perf_counter() - tick
    # every probe in one sweep of the blocks: each reruns only the blocks from its tensor's on
    tick = time.perf_counter()
    variants = [{t.source: Decoded(checkpoint, t, ptype, importance.get(t.name), settings.threads)}
                for t, ptype in probed]
    with tqdm(total=prober.n_blocks, desc=f"probe {len(probed)} tensors", unit="block", disable=settings.quiet,
              leave=False) as bar:
        klds = prober.kld_many(variants, prober.probe_chunks, bar)
    for (t, ptype), kld in zip(probed, klds):
        probes[t.name] = (ptype, kld)
        if errors[t.name][ptype] > 0:
            raw_coef[t.name] = kld / errors[t.name][ptype]
    seconds["probes"] += time.perf_counter() - tick
    coef = _spread(plan, quantizable, raw_coef, dist)
    return Measurement(errors, coef, probes, fixed, seconds)


def user_choices(plan: ModelPlan, overrides: QuantOverrides | None, has_imatrix: bool) -> dict[str, T]:
    """The tensors whose type the user chose (``--tensor-type``, ``--output-type``,
    ``--embedding-type``) and that type, as the mix engine applies it."""
    if overrides is None or overrides.pure:
        return {}
    patterns = [p for p, _ in overrides.compiled()]
    types = plan_file(plan, "q8_0", Path("."), overrides, has_imatrix, require_imatrix=False).tensor_types
    out = {}
    for t in plan.tensors:
        role = tensor_role(t.name)
        if ((role == TOKEN_EMBD and overrides.embedding_type is not None)
                or (role == OUTPUT and overrides.output_type is not None)
                or (is_quantized(types[t.name]) and any(p.search(t.name) for p in patterns))):
            out[t.name] = types[t.name]
    return out


def source_layout(checkpoint, t: TensorPlan, decoded: np.ndarray) -> np.ndarray:
    """A decoded tensor as the checkpoint holds it: rows back in Hugging Face order, the zero
    padding of a padded FFN (``--pad-ffn``) cut off."""
    from ..transforms import undo_transform

    value = undo_transform(t, decoded.reshape(t.shape))
    shape = tuple(checkpoint.tensors[t.source].shape)
    return value if value.shape == shape else value[tuple(slice(0, n) for n in shape)]


def _columns(weights: np.ndarray | None, width: int) -> np.ndarray | None:
    """Column weights of a layer, zero for the padding columns of a padded FFN (their inputs are 0)."""
    if weights is None or len(weights) == width:
        return weights
    return np.concatenate([weights, np.zeros(width - len(weights), dtype=weights.dtype)])


def _sample_rows(t: TensorPlan, limit: int) -> np.ndarray | None:
    if t.n_elements <= limit:
        return None
    step = -(-t.n_elements // limit)
    return np.arange(0, t.shape[0], step)


def _sample_token_rows(counts: np.ndarray, cols: int, limit: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Embedding rows to measure (tokens the calibration text has; rows of tokens it lacks weigh
    nothing), their weights (token frequencies) and the factor that scales their error to all."""
    if not counts.any():
        counts = np.ones_like(counts)
    seen = np.flatnonzero(counts)
    total = counts.sum()
    rows = seen if len(seen) * cols <= limit else seen[:: -(-len(seen) * cols // limit)]
    return rows, counts[rows] / total, float(total / counts[rows].sum())


def _spread(plan, quantizable, raw_coef, dist) -> dict[str, float]:
    """Sensitivity of every tensor: its own when probed, else the median of probed tensors of
    the same kind and cut neighbourhood, then of the same kind, then of all."""
    by_group, by_role = {}, {}
    for name, c in raw_coef.items():
        by_group.setdefault(_group(name, dist), []).append(c)
        by_role.setdefault(tensor_role(name), []).append(c)
    everything = list(raw_coef.values()) or [1.0]
    out = {}
    for t in quantizable:
        if t.name in raw_coef:
            out[t.name] = raw_coef[t.name]
            continue
        pool = by_group.get(_group(t.name, dist)) or by_role.get(tensor_role(t.name)) or everything
        out[t.name] = statistics.median(pool)
    return out


# -- solving and verifying ------------------------------------------------------------------------
def exact_overrides(types: dict[str, T]) -> QuantOverrides:
    """Per-tensor assignments as ``--tensor-type`` rules that match one tensor each."""
    return QuantOverrides(tensor_types=tuple((f"^{re.escape(name)}$", qtype) for name, qtype in types.items()))


def _metadata(target: Target, calib_id: str, changes: Sequence[str],
              kld: float, kld_reference: float | None) -> tuple[MetaItem, ...]:
    items = [
        MetaItem(keys.OPTIMIZE_BASE_MIX, target.reference.quant if target.reference else "", GGUFValueType.STRING),
        MetaItem(keys.OPTIMIZE_BUDGET, int(target.budget), GGUFValueType.UINT64),
        MetaItem(keys.OPTIMIZE_CALIBRATION, calib_id, GGUFValueType.STRING),
        MetaItem(keys.OPTIMIZE_KLD, float(kld), GGUFValueType.FLOAT32),
    ]
    if target.reference is not None:
        items.append(MetaItem(keys.OPTIMIZE_KLD_BASE, float(kld_reference or 0.0), GGUFValueType.FLOAT32))
    items.append(MetaItem(keys.OPTIMIZE_CHANGES, list(changes) or ["none"], GGUFValueType.ARRAY,
                          GGUFValueType.STRING))
    return tuple(items)


def _optimized_plan(plan: ModelPlan, target: Target, choice: dict[str, T], out_dir: Path, has_imatrix: bool,
                    extra: tuple[MetaItem, ...]) -> OptimizedFilePlan:
    """The chosen types through the standard planning path (exact overrides), renamed."""
    fp = plan_file(plan, target.spec, out_dir, exact_overrides(choice), has_imatrix)
    wrong = [n for n, q in choice.items() if fp.tensor_types[n] != q]
    if wrong:
        raise QuantError(f"the mix engine did not keep the optimized type of {wrong[0]}")
    return OptimizedFilePlan(quant=target.key, type_label=target.label, file_type=target.spec.file_type,
                             tensor_types=fp.tensor_types, path=Path(out_dir) / plan.naming.file_name(target.label),
                             extra_metadata=extra)


def _changes(choice: dict[str, T], reference: FilePlan | None) -> list[str]:
    if reference is None:
        return [f"{n}={q.name}" for n, q in choice.items()]
    return [f"{n}={q.name}" for n, q in choice.items() if reference.tensor_types[n] != q]


def solve_target(plan: ModelPlan, target: Target, m: Measurement, settings: OptimizeSettings, calib_id: str,
                 out_dir: Path, has_imatrix: bool) -> tuple[OptimizedFilePlan, float]:
    """The optimized file plan within ``target.budget`` bytes (whole file), and its predicted KLD."""
    probe = OptimizedFilePlan(quant=target.key, type_label=target.label, file_type=target.spec.file_type,
                              tensor_types={**m.fixed, **{n: next(iter(e)) for n, e in m.errors.items()}},
                              path=Path(out_dir) / "x.gguf")
    align_to = alignment(plan)
    whole = file_bytes(plan, probe, _metadata(target, calib_id, [], 0.0, 0.0), settings.base_metadata)
    head = whole - sum(_align(probe.tensor_nbytes(t), align_to) for t in plan.tensors)
    fixed_bytes = sum(_align(probe.tensor_nbytes(t), align_to) for t in plan.tensors if t.name in m.fixed)
    kept = kept_tensors(plan, settings.keep)   # optimize_files checked each target has a reference
    options = {}
    for t in plan.tensors:
        if t.name in m.fixed:
            continue
        options[t.name] = [Option(q, _align(_nbytes(t, q), align_to), m.coef[t.name] * e)
                           for q, e in m.errors[t.name].items()
                           if t.name not in kept or q == target.reference.tensor_types[t.name]]
    start = None
    if target.reference is not None:
        start = {n: target.reference.tensor_types[n] for n in options}
    tensor_budget = target.budget - head - fixed_bytes
    for attempt in range(12):   # the list of changes is metadata too: shrink until the whole file fits
        try:
            choice = solve(options, tensor_budget, start)
        except BudgetTooSmall as exc:
            smallest = exc.smallest + head + fixed_bytes
            raise QuantError(f"{target.label}: a budget of {target.budget:,} bytes "
                             f"({target.budget * 8 / plan.n_params:.3f} bpw) is below the smallest reachable "
                             f"size, {smallest:,} bytes ({smallest * 8 / plan.n_params:.3f} bpw)") from None
        extra = _metadata(target, calib_id, _changes(choice, target.reference), 0.0, 0.0)
        # the fixed types too: deci's zero stand-ins and the user's own choices
        fp = _optimized_plan(plan, target, {**m.fixed, **choice}, out_dir, has_imatrix, extra)
        size = file_bytes(plan, fp, base=settings.base_metadata)
        if size <= target.budget:
            predicted = sum(o.cost for n, opts in options.items() for o in opts if o.qtype == choice[n])
            return fp, predicted
        # doubling the cut each time: an overrun smaller than any tensor's next step down
        # (a padding's 64 bytes) would otherwise leave the same mix, and overrun, every time
        tensor_budget -= (size - target.budget) << attempt
    raise QuantError(f"{target.label}: could not fit the file into {target.budget:,} bytes")


def smallest_plan(plan: ModelPlan, target: Target, out_dir: Path, has_imatrix: bool) -> FilePlan:
    """Every quantizable tensor at its smallest candidate type (the least any mix can weigh)."""
    fixed_plan = plan_file(plan, "q8_0", out_dir, require_imatrix=False)
    types = {}
    for t in plan.tensors:
        if not is_quantized(fixed_plan.tensor_types[t.name]):
            types[t.name] = fixed_plan.tensor_types[t.name]
            continue
        special = tensor_role(t.name) in (OUTPUT, TOKEN_EMBD)
        types[t.name] = candidate_types(t.shape, has_imatrix=has_imatrix, embedding_or_output=special)[0]
    return dataclasses.replace(fixed_plan, tensor_types=types)


def check_reachable(plan: ModelPlan, target: Target, out_dir: Path, has_imatrix: bool,
                    base: Sequence[MetaItem] = ()) -> None:
    """QuantError saying the smallest reachable size when ``target.budget`` is below it."""
    smallest = file_bytes(plan, smallest_plan(plan, target, out_dir, has_imatrix),
                          _metadata(target, "", [], 0.0, 0.0), base)
    if smallest > target.budget:
        raise QuantError(f"{target.label}: a budget of {target.budget:,} bytes "
                         f"({target.budget * 8 / plan.n_params:.3f} bpw) is below the smallest reachable "
                         f"size, {smallest:,} bytes ({smallest * 8 / plan.n_params:.3f} bpw)")


def _nbytes(t: TensorPlan, qtype: T) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return t.n_elements // block * size


def encode_tensor(checkpoint, t: TensorPlan, qtype: T, imatrix=None, threads: int | None = None) -> np.ndarray:
    """Checkpoint tensor ``t`` stored as ``qtype`` (rows of bytes), as the writer stores it."""
    from ..ggml import quantize
    from ..stream import Piece, load_piece

    data = load_piece(checkpoint, Piece(t, 0, t.shape[0])).reshape(-1, t.shape[-1])
    return quantize(data, qtype, imatrix if is_quantized(qtype) else None, threads)


class Decoded:
    """Checkpoint tensor ``t`` stored as ``qtype`` and decoded, in the checkpoint's layout, made
    when called: a sweep calls it at its block's turn (:meth:`Prober.kld_many`), and variants
    naming the same ``key`` share what it made. ``encode(t, qtype)``: where the stored rows come
    from (default: :func:`encode_tensor`, not kept)."""

    def __init__(self, checkpoint, t: TensorPlan, qtype: T, imatrix=None, threads: int | None = None, encode=None):
        self.checkpoint, self.t, self.qtype, self.threads = checkpoint, t, qtype, threads
        self.encode = encode or (lambda t, q: encode_tensor(checkpoint, t, q, imatrix, threads))
        self.key = (t.name, qtype)

    def __call__(self) -> np.ndarray:
        from ..ggml import dequantize

        decoded = dequantize(self.encode(self.t, self.qtype), self.qtype, self.t.shape[-1], self.threads)
        return source_layout(self.checkpoint, self.t, decoded)


class MixVerifier:
    """Measures whole mixes: every tensor decoded from its type in the mix, all the mixes in one
    sweep of the blocks (:meth:`Prober.kld_many`; a tensor two mixes give the same type is
    decoded once).

    The encodings of the mixes to be written (``keep``: those of the optimized mixes; a
    standard mix is only written when it measures better, and then quantized again) go to
    ``store`` (:class:`~shortquant.quant.encoding_store.EncodingStore`, on disk) for the writer:
    the file written is then made of the very bytes that were measured, and nothing is
    quantized twice. What does not fit the store is quantized again by the writer.
    """

    def __init__(self, checkpoint, plan: ModelPlan, prober, importance: dict, threads: int | None,
                 store=None, keep: Sequence[dict[str, T]] = ()):
        self.checkpoint, self.plan, self.prober = checkpoint, plan, prober
        self.importance, self.threads = importance, threads
        self.store = store
        self.keep = {(name, q) for types in keep for name, q in types.items()}

    def measure_many(self, mixes: Sequence[dict[str, T]], which: slice, progress=None) -> list[float]:
        """Calibration KLD of the model with every tensor decoded from each mix's types."""
        variants = []
        for types in mixes:
            variants.append({t.source: Decoded(self.checkpoint, t, types[t.name], threads=self.threads,
                                               encode=self._encode)
                             for t in self.plan.tensors
                             if not t.computed and (is_quantized(types[t.name]) or types[t.name] != T.F32)})
        return self.prober.kld_many(variants, which, progress)

    def _encode(self, t: TensorPlan, qtype: T) -> np.ndarray:
        # called once per (tensor, type): the sweep shares a decoded tensor between the mixes
        encoded = encode_tensor(self.checkpoint, t, qtype, self.importance.get(t.name), self.threads)
        if self.store is not None and (t.name, qtype) in self.keep:
            self.store.put((t.name, qtype), encoded)
        return encoded

    def encodings(self, types: dict[str, T]) -> dict:
        """The stored encodings of a mix's tensors (tensor name -> rows, read back when sliced)."""
        if self.store is None:
            return {}
        return {name: rows for name, q in types.items() if (rows := self.store.rows((name, q))) is not None}


def standard_types(plan: ModelPlan, targets: Sequence[Target], out_dir: Path, overrides,
                   has_imatrix: bool) -> dict[str, set[T]]:
    """Per tensor, every type a standard mix gives it: those of all REFERENCE_MIXES, whichever
    targets were asked for (so a ladder measures the very candidates a single run does and
    writes the same bytes), plus those of the targets' own standard mixes."""
    out: dict[str, set[T]] = {}
    mixes = [plan_file(plan, name, out_dir, overrides, has_imatrix, require_imatrix=False) for name in REFERENCE_MIXES]
    for fp in mixes + [t.reference for t in targets if t.reference is not None]:
        for name, qtype in fp.tensor_types.items():
            out.setdefault(name, set()).add(qtype)
    return out


def store_capacity(out_dir: Path, targets: Sequence[Target]) -> int:
    """Bytes of encodings worth keeping on disk for the writer: the free space of ``out_dir`` less
    what the files themselves will take (the targets' budgets) and a margin."""
    import shutil

    free = shutil.disk_usage(out_dir).free
    return max(0, free - sum(t.budget for t in targets) - (256 << 20))


# From this many parameters probing is the optimizer's largest cost beside quantizing: each probe
# reruns the blocks after its tensor's, so it grows with depth as an export does, and what keeps
# the ratio down is fewer probe tokens and probes (big_model_defaults).
BIG_PARAMS = 500_000_000


def big_model_defaults(settings: OptimizeSettings, n_params: int) -> OptimizeSettings:
    """The settings left unset, by model size. Up to BIG_PARAMS parameters: two probe chunks of
    the whole ``ctx``, every kind probed in every probed block, two verification chunks, errors
    measured on SAMPLE_VALUES values a tensor. Beyond: one probe chunk of half ``ctx``, the sample
    blocks probing half the kinds each (:func:`probe_plan`), one verification chunk and half the
    values. On the demo one probe chunk instead of two cost a few points of the gain; on a
    LLaMA-7B-shaped model the probe cuts together take probing to about a sixth, and the last
    two take a tenth off the run (quantizing both mixes whole is most of what is left)."""
    big = n_params > BIG_PARAMS
    return dataclasses.replace(
        settings,
        probe_chunks=settings.probe_chunks if settings.probe_chunks is not None else (1 if big else 2),
        probe_ctx=settings.probe_ctx or (max(16, settings.ctx // 2) if big else settings.ctx),
        split_kinds=settings.split_kinds if settings.split_kinds is not None else big,
        verify_chunks=settings.verify_chunks if settings.verify_chunks is not None else (1 if big else 2),
        sample_values=settings.sample_values or (SAMPLE_VALUES // 2 if big else SAMPLE_VALUES))


def optimize_files(checkpoint, plan: ModelPlan, files: Sequence[FilePlan], targets: Sequence[Target],
                   settings: OptimizeSettings, importance: dict, out_dir: Path,
                   has_imatrix: bool) -> tuple[list[FilePlan], list[Outcome]]:
    """Measure once, then solve and verify every target; ``files`` with each optimized file in
    place of its standard mix (or added, for bpw/size targets)."""
    from ..evaluate.perplexity import read_text
    from .imatrix import chunk_tokens
    from ..tokenizer.encode import encode_text
    from ..system import peak_rss
    from tqdm import tqdm

    from .encoding_store import EncodingStore
    from .probe import Prober, probe_from

    for target in targets:   # before any measuring: a budget nothing can meet is an error at once
        check_reachable(plan, target, out_dir, has_imatrix, settings.base_metadata)
        if settings.keep and target.reference is None:
            raise QuantError(f"{target.label}: --optimize-keep holds tensors at the standard mix's types, "
                             f"and no standard mix fits a budget of {target.budget:,} bytes")
    text = read_text(settings.calib)
    calib_id = f"{Path(settings.calib).name} sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    tokens, bos = encode_text(plan.source, text)
    settings = big_model_defaults(settings, plan.n_params)
    want = settings.probe_chunks + settings.verify_chunks
    chunks = chunk_tokens(tokens, ctx=settings.ctx, chunks=want, bos_id=bos)
    if len(chunks) <= settings.probe_chunks:
        # too short to keep the verification apart: it reuses the probe chunks (and says so)
        probe_slice = verify_slice = slice(0, len(chunks))
        settings = dataclasses.replace(settings, probe_chunks=len(chunks))
        reused = True
    else:
        probe_slice, verify_slice = slice(0, settings.probe_chunks), slice(settings.probe_chunks, len(chunks))
        reused = False
    del probe_slice
    chunks = [c[:settings.probe_ctx] if i < settings.probe_chunks and not reused else c for i, c in enumerate(chunks)]
    started = time.perf_counter()
    peaks = {"before": peak_rss()}
    where_from = probe_from(settings.probe_from, plan.n_params, checkpoint)
    prober = Prober(plan.source, chunks, settings.threads, plan.block_map.stored, settings.probe_chunks,
                    stream=where_from == "disk")
    seconds = {"model and reference": time.perf_counter() - started}
    peaks["model and reference"] = peak_rss()
    extra_types = standard_types(plan, targets, out_dir, settings.overrides, has_imatrix)
    m = measure(checkpoint, plan, prober, importance, settings, extra_types, has_imatrix)
    seconds.update(m.seconds)
    peaks["errors and probes"] = peak_rss()
    started = time.perf_counter()

    solved = [solve_target(plan, target, m, settings, calib_id, out_dir, has_imatrix) for target in targets]
    # every target's optimized mix and its standard mix, measured in one sweep (each mix once)
    mixes: list[dict[str, T]] = []
    for target, (fp, _) in zip(targets, solved):
        for types in ([target.reference.tensor_types] if target.reference is not None else []) + [fp.tensor_types]:
            if types not in mixes:
                mixes.append(types)
    store = EncodingStore(out_dir, store_capacity(out_dir, targets))
    verifier = MixVerifier(checkpoint, plan, prober, importance, settings.threads, store,
                           keep=[fp.tensor_types for fp, _ in solved])
    outcomes = []
    replaced: dict[str, FilePlan] = {}
    added: list[FilePlan] = []
    try:
        with tqdm(total=prober.n_blocks, desc=f"verify {len(mixes)} mixes", unit="block", disable=settings.quiet,
                  leave=False) as bar:
            measured = verifier.measure_many(mixes, verify_slice, bar)
        for target, (fp, predicted) in zip(targets, solved):
            kld = measured[mixes.index(fp.tensor_types)]
            ref_kld = None if target.reference is None else measured[mixes.index(target.reference.tensor_types)]
            extra = _metadata(target, calib_id, _changes(fp.tensor_types, target.reference), kld, ref_kld)
            fp = dataclasses.replace(fp, extra_metadata=extra)
            size = file_bytes(plan, fp, base=settings.base_metadata)
            outcome = Outcome(target, fp, True, kld, ref_kld, predicted, size)
            where = ("the probe chunks (text too short to keep them apart)" if reused
                     else "held-apart calibration chunks")
            if ref_kld is not None and kld >= ref_kld:
                outcome.file, outcome.optimized = target.reference, False
                outcome.bytes = file_bytes(plan, target.reference, base=settings.base_metadata)
                outcome.notes.append(f"{target.label}: the optimized mix measured no better than "
                                     f"{target.reference.type_label} on {where} (KLD {kld:.5f} vs {ref_kld:.5f}); "
                                     f"wrote the standard {target.reference.type_label} instead")
            else:
                versus = (f", {target.reference.type_label} {ref_kld:.5f} ({(kld / ref_kld - 1) * 100:+.1f}%)"
                          if ref_kld else " (no standard mix fits this budget to compare with)")
                outcome.notes.append(f"{target.label}: {outcome.bytes:,} bytes of a {target.budget:,} budget; "
                                     f"KLD on {where} {kld:.5f}{versus}")
            outcome.encoded = verifier.encodings(outcome.file.tensor_types)
            outcomes.append(outcome)
            ref = target.reference
            if target.key.endswith("-opt") and ref is not None and target.key[:-4] == ref.quant:
                replaced[ref.quant] = outcome.file
            else:
                added.append(outcome.file)
    except BaseException:
        store.close()   # the writer will not come: give the disk space back now
        raise
    seconds["solve and verify"] = time.perf_counter() - started
    peaks["solve and verify"] = peak_rss()
    for outcome in outcomes:
        outcome.seconds, outcome.peak_rss, outcome.probe_from = seconds, peaks, where_from
    out = [replaced.get(f.quant, f) for f in files] + [f for f in added if f.quant not in {x.quant for x in files}]
    return _unique(out), outcomes


def _unique(files: list[FilePlan]) -> list[FilePlan]:
    seen, out = set(), []
    for f in files:
        if f.quant not in seen:
            seen.add(f.quant)
            out.append(f)
    return out
