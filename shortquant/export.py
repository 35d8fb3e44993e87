"""``export``: open source -> make plan -> stream tensors -> write files.

>>> from shortquant.export import ExportOptions, export
>>> report = export(Path("models/demo"), ExportOptions(quants=("q8_0",), out_dir=Path("gguf")))  # doctest: +SKIP
>>> report.files[0].path.name                                                               # doctest: +SKIP
'Shortquant-Demo-5.0M-stories-Q8_0.gguf'
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import GGUFError, OutputError, QuantError, ShortquantError, SourceError
from .gguf_out import GGUFFileWriter
from .hub import is_hub_id
from .plan import FilePlan, ModelPlan
from .quant.mixes import plan_file
from .resources import DEMO_RECIPE, demo_model, is_demo_model
from .source.checkpoint import Checkpoint, open_checkpoint
from .stream import WriteBehind, load_piece, pieces, read_ahead


@dataclass(frozen=True)
class ExportOptions:
    quants: tuple[str, ...] = ("f16",)
    out_dir: Path = Path("gguf")
    source_blocks: tuple[int, ...] | None = None   # original index of each stored block
    remove_blocks: tuple[int, ...] | None = None   # stored blocks to leave out (--remove-blocks)
    pruning_method: str | None = None              # how remove_blocks were chosen (for the GGUF and card)
    recipe: object | None = None                    # shortquant.recipes.Recipe
    chat_template: str | None = None                # built-in template name
    pre: str | None = None                          # llama.cpp BPE pre-tokenizer name, when not detected
    name: str | None = None                         # overrides general.name / the guessed basename
    allow_nonfinite: bool = False
    threads: int | None = None
    overrides: object | None = None                 # shortquant.quant.mixes.QuantOverrides
    imatrix: Path | None = None                     # llama.cpp imatrix file (GGUF or legacy .dat)
    quiet: bool = False
    force: bool = False                             # write even if the free space looks too small
    base_model: str | None = None                   # hub id for general.base_model / the card
    license: str | None = None                      # hub license id for general.license / the card
    optimize: object | None = None                  # shortquant.quant.optimize.OptimizeRequest
    pad_ffn: int | None = None                      # zero-pad FFN widths to a multiple (None: pruned ones to 256)


# Every option of ``export`` that decides what is written, with its default: the CLI's flags
# (``--pad-ffn`` is ``pad_ffn``, ``--license`` is ``license``) and a jobs file's keys, both turned
# into ExportOptions by :func:`options_from`. ``quants`` None: f16, or only the file of a target.
EXPORT_SETTINGS: dict[str, object] = {
    "quants": None, "recipe": None, "source_blocks": None, "remove_blocks": None, "chat_template": None,
    "name": None, "pre": None,
    "pad_ffn": None, "imatrix": None, "output_type": None, "embedding_type": None, "tensor_types": (),
    "pure": False, "optimize": False, "target_bpw": None, "target_size": None, "calib": None, "threads": None,
    "allow_nonfinite": False, "base_model": None, "license": None, "force": False, "probe_from": "auto",
    "optimize_keep": None,
}


def options_from(source: str | None, out_dir: Path, *, quiet: bool = False,
                 note: Callable[[str], None] | None = None, **settings) -> tuple[Path, ExportOptions]:
    """The checkpoint folder of ``source`` (see :func:`resolve_source`) and the ExportOptions of
    ``settings`` (keys of :data:`EXPORT_SETTINGS`; the others take their defaults). ``note`` hears
    which recipe a known release implies.

    >>> path, options = options_from(None, Path("gguf"), quants=("q8_0",), pad_ffn=0)
    >>> options.recipe.name, options.quants, options.pad_ffn
    ('shortquant-demo', ('q8_0',), 0)
    """
    from .quant.mixes import QuantOverrides
    from .recipes import load_recipe

    unknown = sorted(set(settings) - set(EXPORT_SETTINGS))
    if unknown:
        raise TypeError(f"not export options: {', '.join(unknown)}")
    s = {**EXPORT_SETTINGS, **settings}
    overrides = QuantOverrides.parse(output_type=s["output_type"], embedding_type=s["embedding_type"],
                                     pure=s["pure"], tensor_types=list(s["tensor_types"] or ()))
    request = optimize_request(s["optimize"], s["target_bpw"], s["target_size"], s["calib"], s["probe_from"],
                               s["optimize_keep"])
    path, implied = resolve_source(source)
    if implied and not s["recipe"] and source is not None and note is not None:
        note(f"using recipe {implied} (known release; --recipe to choose another)")
    recipe = s["recipe"] or implied
    blocks, remove = (_block_list(s[key], option) for key, option in (("source_blocks", "--source-blocks"),
                                                                      ("remove_blocks", "--remove-blocks")))
    return path, ExportOptions(
        quants=default_quants(s["quants"], s["target_bpw"], s["target_size"]), out_dir=Path(out_dir),
        recipe=load_recipe(recipe) if recipe else None, source_blocks=blocks,
        chat_template=s["chat_template"], pre=s["pre"], name=s["name"], allow_nonfinite=s["allow_nonfinite"],
        threads=s["threads"], overrides=overrides, imatrix=Path(s["imatrix"]) if s["imatrix"] else None,
        quiet=quiet, force=s["force"], base_model=s["base_model"], license=s["license"], optimize=request,
        pad_ffn=s["pad_ffn"], remove_blocks=remove)


def _block_list(value, option: str) -> tuple[int, ...] | None:
    """A list of block indices as the CLI writes it (``0-23,30``; a jobs file may give numbers)."""
    from .layers import parse_block_list

    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    if not value:
        return None
    try:
        return tuple(parse_block_list(value))
    except (ValueError, TypeError):
        raise SourceError(f"{option}: {value!r} is not a list like '0-23,30,31'") from None


def default_quants(quants, target_bpw=None, target_size=None) -> tuple[str, ...]:
    """The types to write: those given; none given, f16 (or, beside a size or bpw target, none:
    a target alone writes only its own file)."""
    if quants is not None:
        return tuple(quants)
    return () if target_bpw is not None or target_size is not None else ("f16",)


def optimize_request(optimize: bool, target_bpw, target_size, calib, probe_from: str = "auto", keep=None):
    """--optimize / --target-bpw / --target-size / --calib / --probe-from / --optimize-keep as an
    OptimizeRequest (or None)."""
    from .quant.optimize import OptimizeRequest, parse_keep, parse_target_bpw
    from .sizes import parse_size

    wanted = optimize or target_bpw is not None or target_size is not None
    if not wanted:
        if calib is not None or keep is not None:
            option = "--calib" if calib is not None else "--optimize-keep"
            raise QuantError(f"{option} is only used with --optimize, --target-bpw or --target-size")
        return None
    if calib is None:
        raise QuantError("--optimize, --target-bpw and --target-size need a calibration text: --calib FILE")
    size = parse_size(target_size, QuantError, "--target-size") if target_size is not None else None
    bpw = parse_target_bpw(target_bpw) if target_bpw is not None else None
    return OptimizeRequest(calib=Path(calib), optimize=optimize, target_bpw=bpw, target_size=size,
                           probe_from=probe_from, keep=parse_keep(keep) if keep is not None else ())


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
    skipped: dict[str, str] = field(default_factory=dict)  # quants `all` could not make, and why
    seconds: float = 0.0
    removed_stale: list[Path] = field(default_factory=list)  # .part files of killed runs, removed
    optimized: list = field(default_factory=list)   # shortquant.quant.optimize.Outcome per target


def make_model_plan(checkpoint: Checkpoint, options: ExportOptions) -> ModelPlan:
    from .families import make_model_plan as plan_for_family

    return plan_for_family(checkpoint, options)


def plan_files(plan: ModelPlan, options: ExportOptions) -> tuple[list[FilePlan], dict[str, str]]:
    """One FilePlan per requested type, and the types ``all`` had to skip (with why).

    A type named explicitly that cannot be made (say, an IQ type without an imatrix) is an
    error; the same type reached through ``all`` is skipped with a note.
    """
    from .quant.types import parse_quant, parse_quants

    has_imatrix = options.imatrix is not None
    explicit = {parse_quant(q).name for q in options.quants if q.strip().lower() != "all"}
    files, skipped = [], {}
    for spec in parse_quants(list(options.quants)):
        try:
            files.append(plan_file(plan, spec, options.out_dir, options.overrides, has_imatrix))
        except QuantError as exc:
            if spec.name in explicit:
                raise
            skipped[spec.name] = str(exc)
    return files, skipped


def export(source: Path, options: ExportOptions, split_limit: int | None = None) -> ExportReport:
    """Convert the checkpoint at ``source`` into one GGUF file per requested type.

    ``split_limit``: the caller splits files over this many bytes afterwards, so the free-space
    check also counts the parts written beside the largest such file."""
    start = time.perf_counter()
    checkpoint = open_checkpoint(source)
    plan = make_model_plan(checkpoint, options)
    files, skipped = plan_files(plan, options)
    importance = load_importance(options.imatrix, plan) if options.imatrix else {}
    stale = prepare_out_dir(options.out_dir)
    extra = source_metadata(checkpoint, plan, options)
    outcomes = []
    if options.optimize is not None:   # measured mixes replace (or add to) the standard ones
        from .quant.optimize import run_optimizer

        files, outcomes = run_optimizer(checkpoint, plan, files, options, importance, extra)
    check_space(plan, files, options, extra, split_limit)
    measured = {o.file.quant: o.encoded for o in outcomes}   # bytes the optimizer already quantized
    report = write_files(checkpoint, plan, files, options, importance, extra, measured)
    for outcome in outcomes:   # written: the report need not hold the encodings (nor their temporary file)
        outcome.encoded = {}
    report.skipped = skipped
    report.removed_stale = stale
    report.optimized = outcomes
    report.seconds = time.perf_counter() - start
    return report


def load_importance(path: Path, plan: ModelPlan) -> dict[str, np.ndarray]:
    """Per-column importance of every planned tensor the imatrix covers (checked to fit)."""
    from gguf import MODEL_TENSOR

    from .quant.imatrix import match_model, read_imatrix

    imatrix = read_imatrix(path)   # refuses non-finite values
    for t in plan.tensors:         # an imatrix of the unpadded model fits a zero-padded ffn_down:
        sums = imatrix.sums.get(t.name)   # its padded columns (all zero) get the mean importance
        if t.kind == MODEL_TENSOR.FFN_DOWN and sums is not None and 0 < sums.shape[-1] < t.shape[-1]:
            extra = np.repeat(sums.mean(axis=-1, keepdims=True), t.shape[-1] - sums.shape[-1], axis=-1)
            imatrix.sums[t.name] = np.concatenate([sums, extra], axis=-1)
    return match_model(imatrix, {t.name: t.shape for t in plan.tensors}, path)


def prepare_out_dir(out_dir: Path) -> list[Path]:
    """Create ``out_dir``, check it is writable, remove stale ``.part`` files of killed runs
    (never one a running export holds); return those removed."""
    from .partfiles import remove_stale_parts

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".shortquant-probe-"):
            pass
    except FileExistsError:
        raise OutputError("output path exists and is not a folder", out_dir) from None
    except OSError as exc:
        raise OutputError(f"output folder is not writable ({exc.strerror or exc})", out_dir) from None
    return remove_stale_parts(out_dir)


def source_metadata(checkpoint: Checkpoint, plan: ModelPlan, options: ExportOptions) -> tuple:
    """License, base model, languages and datasets the source's own card gives (or the options),
    as GGUF metadata the plan does not already hold (a recipe's say wins)."""
    from .source.model_card import metadata_items, read_source_card

    card = read_source_card(checkpoint.folder, base_model=options.base_model, license=options.license)
    return tuple(metadata_items(card, {item.key for item in plan.metadata}))


def check_space(plan: ModelPlan, files: Sequence[FilePlan], options: ExportOptions,
                extra_metadata: Sequence = (), split_limit: int | None = None) -> int:
    """Refuse up front when the planned files (exact sizes) do not fit; return the bytes needed.

    With ``split_limit``, files over it are split one at a time after the export: the parts of
    the largest one stand beside it until it is removed, so that much more must fit."""
    from .space import check_free_space, split_reserve

    sizes = [GGUFFileWriter(plan, f, extra_metadata).planned_size() for f in files]
    needed = sum(sizes) + split_reserve(sizes, split_limit)
    check_free_space(options.out_dir, needed, options.force)
    return needed


def write_files(checkpoint: Checkpoint, plan: ModelPlan, files: Sequence[FilePlan],
                options: ExportOptions, importance: dict[str, np.ndarray] | None = None,
                extra_metadata: Sequence = (), encoded: dict[str, dict[str, np.ndarray]] | None = None
                ) -> ExportReport:
    """Read every tensor once, in pieces, and write each piece into every file of ``files``.

    ``encoded``: per file, tensors already quantized (whole, as rows of bytes); their pieces are
    sliced from there instead of quantized again.

    The next piece is read while the current one is quantized. A failure specific to one file
    (say, a quantization error) abandons that file only; the others are finished. Bad source
    data (NaN, a short read) abandons them all.
    """
    from tqdm import tqdm

    from .ggml import quantize
    from .quant.types import is_quantized

    writers: dict[str, GGUFFileWriter] = {}
    failed: dict[str, str] = {}
    seconds = {f.quant: 0.0 for f in files}
    with contextlib.ExitStack() as stack:
        for f in files:
            writer = GGUFFileWriter(plan, f, extra_metadata, validate_data=not options.allow_nonfinite)
            stack.callback(writer.abort)   # no-op once committed; registered first, so an
            writer.open()                  # interrupted open() leaves nothing either
            writers[f.quant] = writer
        write_behind = stack.enter_context(WriteBehind())   # closed (drained) before the aborts run
        bar = stack.enter_context(tqdm(total=plan.n_params, unit="w", unit_scale=True, disable=options.quiet,
                                       desc=_bar_label(files), leave=False))
        todo = pieces(plan)
        # Two buffers in turn: one piece is quantized while the next is read into the other.
        buffers = [np.empty(max(p.n_values for p in todo), dtype=np.float32) for _ in range(2)]
        for piece, data in read_ahead(
                lambda i: load_piece(checkpoint, todo[i], options.allow_nonfinite, buffers[i % 2]), todo):
            name = piece.tensor.name
            column_weights = (importance or {}).get(name)
            if column_weights is not None and len(piece.tensor.shape) == 3:   # one row per expert
                column_weights = column_weights.reshape(piece.tensor.shape[0], -1)[piece.start:piece.stop]
            for f in files:
                if f.quant in failed:
                    continue
                t0 = time.perf_counter()
                qtype = f.tensor_types[name]
                try:
                    done = (encoded or {}).get(f.quant, {}).get(name)
                    if done is not None and len(piece.tensor.shape) > 1:
                        rows = done[piece.start:piece.stop]
                    else:
                        rows = quantize(data, qtype, column_weights if is_quantized(qtype) else None, options.threads,
                                        validate=not options.allow_nonfinite)
                    write_behind.submit(writers[f.quant].write, name, rows)
                except QuantError as exc:
                    failed[f.quant] = f"{name}: {exc}"
                    write_behind.wait()
                    writers[f.quant].abort()
                seconds[f.quant] += time.perf_counter() - t0
            bar.update(data.size)
        write_behind.wait()
        exported = []
        for f in files:
            if f.quant in failed:
                continue
            try:
                path = writers[f.quant].commit()   # checks the file before renaming it
            except GGUFError as exc:
                failed[f.quant] = str(exc)
                writers[f.quant].abort()
                continue
            exported.append(ExportedFile(path=path, quant=f.quant, type_label=f.type_label,
                                         bytes=path.stat().st_size, n_params=plan.n_params,
                                         seconds=seconds[f.quant]))
    if failed and not exported:
        quant, reason = next(iter(failed.items()))
        raise QuantError(f"{quant} failed: {reason}")
    return ExportReport(plan=plan, files=exported, failed=failed)


def _bar_label(files: Sequence[FilePlan]) -> str:
    labels = [f.type_label for f in files]
    return f"export {', '.join(labels)}" if len(labels) <= 4 else f"export {len(labels)} types"


_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.jinja"]


def resolve_source(source: str | None) -> tuple[Path, str | None]:
    """The checkpoint folder to read and the recipe it implies.

    No source, or the demo model's own folder: the embedded demo model with its recipe. A local
    folder whose name is a known release's: that release's recipe. A hub id
    (``nota-ai/st-vicuna-v1.3-5.5b-taylor``) that is not a local path: downloaded with
    huggingface_hub, with its recipe when it is a known release.
    """
    if source is None:
        demo = demo_model()
        if not (demo / "config.json").is_file():
            raise ShortquantError("the embedded demo model is missing from this installation", demo)
        return demo, DEMO_RECIPE
    path = Path(source)
    if is_demo_model(path):   # the same folder, the same plan, whichever way it is named
        return demo_model(), DEMO_RECIPE
    if path.exists():
        return path, _known_recipe(path.resolve().name)
    if is_hub_id(source):   # not a local path: org/name, nothing else
        return download(source), _known_recipe(source)
    raise SourceError("no such folder", path)


def _known_recipe(name: str) -> str | None:
    from .recipes import RecipeError, load_recipe

    try:
        return load_recipe(name).name
    except RecipeError:
        return None


def download(repo_id: str) -> Path:
    """Fetch the files a conversion needs from the hub (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=_DOWNLOAD_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: all one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"not a local folder, and downloading it from the hub failed ({first[:200]})",
                          repo_id) from None
