"""``export``: open source -> make plan -> stream tensors -> write files.

>>> from shortquant.export import ExportOptions, export
>>> results = export(Path("models/demo"), ExportOptions(quants=("q8_0",), out_dir=Path("gguf")))  # doctest: +SKIP
>>> results[0].path.name
'Shortquant-Demo-5.0M-stories-Q8_0.gguf'
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import OutputError, QuantError, ShortquantError, WeightError
from .gguf_out import GGUFFileWriter
from .plan import FilePlan, ModelPlan, plan_file
from .source.checkpoint import Checkpoint, open_checkpoint
from .transforms import apply_transform

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO_ROOT / "models" / "demo"
DEMO_RECIPE = "shortquant-demo"


@dataclass(frozen=True)
class ExportOptions:
    quants: tuple[str, ...] = ("f16",)
    out_dir: Path = Path("gguf")
    source_blocks: tuple[int, ...] | None = None   # original index of each stored block
    recipe: object | None = None                    # shortquant.recipes.Recipe
    chat_template: str | None = None                # built-in template name
    name: str | None = None                         # overrides general.name / the guessed basename
    allow_nonfinite: bool = False
    threads: int | None = None
    overrides: object | None = None                 # shortquant.quant.mixes.QuantOverrides
    imatrix: object | None = None                   # shortquant.quant.imatrix.ImportanceMatrix
    quiet: bool = False


@dataclass
class ExportedFile:
    path: Path
    quant: str
    type_label: str
    bytes: int
    n_params: int
    seconds: float = 0.0

    @property
    def bpw(self) -> float:
        return self.bytes * 8 / self.n_params


@dataclass
class ExportReport:
    plan: ModelPlan
    files: list[ExportedFile]
    failed: dict[str, str] = field(default_factory=dict)   # quant -> one-line reason
    seconds: float = 0.0


def make_model_plan(checkpoint: Checkpoint, options: ExportOptions) -> ModelPlan:
    from converters import find_converter

    return find_converter(checkpoint).make_plan(checkpoint, options)


def plan_files(plan: ModelPlan, options: ExportOptions) -> list[FilePlan]:
    from .quant.types import parse_quants

    has_imatrix = options.imatrix is not None
    return [plan_file(plan, spec, options.out_dir, options.overrides, has_imatrix)
            for spec in parse_quants(list(options.quants))]


def export(source: Path, options: ExportOptions) -> ExportReport:
    """Convert the checkpoint at ``source`` into one GGUF file per requested type."""
    start = time.perf_counter()
    checkpoint = open_checkpoint(source)
    plan = make_model_plan(checkpoint, options)
    files = plan_files(plan, options)
    if options.imatrix is not None:
        options.imatrix.check_against(plan)
    prepare_out_dir(options.out_dir)
    report = write_files(checkpoint, plan, files, options)
    report.seconds = time.perf_counter() - start
    return report


def prepare_out_dir(out_dir: Path) -> None:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".shortquant-probe-"):
            pass
    except FileExistsError:
        raise OutputError("output path exists and is not a folder", out_dir) from None
    except OSError as exc:
        raise OutputError(f"output folder is not writable ({exc.strerror or exc})", out_dir) from None


def write_files(checkpoint: Checkpoint, plan: ModelPlan, files: Sequence[FilePlan],
                options: ExportOptions) -> ExportReport:
    """Stream every tensor once and write it into every file of ``files``.

    A failure specific to one file (say, a quantization error) abandons that file only; the
    others are finished. Bad source data (NaN, a short read) abandons them all.
    """
    from tqdm import tqdm

    from .quant.ggml import quantize

    writers: dict[str, GGUFFileWriter] = {}
    failed: dict[str, str] = {}
    started: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        for f in files:
            writer = GGUFFileWriter(plan, f)
            writer.open()
            stack.callback(writer.abort)   # no-op once committed
            writers[f.quant] = writer
            started[f.quant] = 0.0
        total = sum(t.n_elements for t in plan.tensors)
        bar = tqdm(total=total, unit="w", unit_scale=True, disable=options.quiet,
                   desc=f"export {', '.join(f.type_label for f in files)}", leave=False)
        with bar:
            for tensor in plan.tensors:
                data = load_tensor(checkpoint, tensor, options.allow_nonfinite)
                importance = options.imatrix.for_tensor(tensor.name) if options.imatrix is not None else None
                for f in files:
                    if f.quant in failed:
                        continue
                    t0 = time.perf_counter()
                    qtype = f.tensor_types[tensor.name]
                    try:
                        encoded = quantize(data, qtype, importance if qtype_takes_imatrix(qtype) else None,
                                           options.threads)
                        writers[f.quant].write_tensor(tensor.name, encoded)
                    except QuantError as exc:
                        failed[f.quant] = f"{tensor.name}: {exc}"
                        writers[f.quant].abort()
                    started[f.quant] += time.perf_counter() - t0
                del data
                bar.update(tensor.n_elements)
        exported = []
        for f in files:
            if f.quant in failed:
                continue
            path = writers[f.quant].commit()
            exported.append(ExportedFile(path=path, quant=f.quant, type_label=f.type_label,
                                         bytes=path.stat().st_size, n_params=plan.n_params,
                                         seconds=started[f.quant]))
    if failed and not exported:
        quant, reason = next(iter(failed.items()))
        raise QuantError(f"{quant} failed: {reason}")
    return ExportReport(plan=plan, files=exported, failed=failed)


def qtype_takes_imatrix(qtype) -> bool:
    from .quant.types import is_quantized

    return is_quantized(qtype)


def load_tensor(checkpoint: Checkpoint, tensor, allow_nonfinite: bool = False) -> np.ndarray:
    """Read one source tensor as float32, apply its transform, refuse NaN/Inf unless allowed."""
    ref = checkpoint.tensors[tensor.source]
    try:
        data = ref.load()
    except OSError as exc:
        raise WeightError(f"cannot read tensor {tensor.source!r} ({exc})", ref.path) from None
    if not allow_nonfinite and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise WeightError(f"tensor {tensor.source!r} has {bad} NaN/Inf values "
                          f"(use --allow-nonfinite to export anyway)", ref.path)
    return apply_transform(tensor, data)


def resolve_source(source: str | None) -> tuple[Path, str | None]:
    """The checkpoint folder to read and the recipe it implies (the demo when no source)."""
    if source is None:
        if not (DEMO_MODEL / "config.json").is_file():
            raise ShortquantError("the embedded demo model is missing from this installation", DEMO_MODEL)
        return DEMO_MODEL, DEMO_RECIPE
    return Path(source), None
