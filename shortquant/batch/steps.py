"""The work for one model of a catalogue, in three resumable steps: export, evaluate, finish.

Each step reads the model's state file, does only what is missing or no longer intact, and
records what it finished. Local mode runs the three in one process (:func:`run_model`); Ray
mode runs each as a task of its own, chained. A step never raises for a problem of its model:
the problem becomes the outcome's one-line ``reason`` and the later steps pass it on.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import ShortquantError
from ..export import EXPORT_SETTINGS, ExportedFile
from .jobsfile import ModelJob
from .state import ModelState, fingerprint

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunSettings:
    """How the steps run (the same for every model of one batch run)."""

    threads: int | None = None    # quantization/eval threads when the job sets none
    quiet: bool = True            # no progress bars inside the steps
    publish: bool = False         # upload each finished model folder to its repo
    dry_run: bool = False         # stage the upload instead (no network)


@dataclass
class ModelOutcome:
    folder: str
    source: str
    made: list[str] = field(default_factory=list)      # types written by this run
    kept: list[str] = field(default_factory=list)      # types already finished and intact
    failed: dict[str, str] = field(default_factory=dict)   # type -> one-line reason
    reason: str | None = None                           # why the model failed, one line
    internal: bool = False                              # the failure is a bug, not bad input
    steps: list[str] = field(default_factory=list)      # what happened, in order (for the log)
    seconds: float = 0.0
    nodes: list[str] = field(default_factory=list)      # Ray node of each step (empty locally)
    rows: list[dict] = field(default_factory=list)      # the catalogue rows of this model

    @property
    def ok(self) -> bool:
        return self.reason is None and not self.failed


def run_model(job: ModelJob, out_root: str | Path, settings: RunSettings, log: Log | None = None) -> ModelOutcome:
    """All steps of one model, one after another (local mode)."""
    outcome = export_step(job, out_root, settings, log)
    outcome = evaluate_step(job, out_root, settings, outcome, log)
    return finish_step(job, out_root, settings, outcome, log)


# -- export --------------------------------------------------------------------------------

def export_step(job: ModelJob, out_root: str | Path, settings: RunSettings, log: Log | None = None) -> ModelOutcome:
    """Write the types of the ladder that are not finished and intact; split them if asked.

    An optimizing job (--optimize, a target) is redone whole: which files it writes depends on
    what it measures (a standard mix that measures better is written instead)."""
    outcome = ModelOutcome(folder=job.folder, source=job.source)
    folder = Path(out_root) / job.folder
    start = time.perf_counter()
    _note_node(outcome)
    with _guard(outcome, "export", log):
        state = ModelState.load(folder)
        expected = export_fingerprint(job)
        ladder = ladder_names(job, state, expected)
        skipped = state.data.get("skipped", {})
        todo = []
        for quant in ladder:
            if state.finished_file(quant, expected):
                outcome.kept.append(quant)
            elif skipped.get(quant, {}).get("fingerprint") != expected:
                todo.append(quant)
        redo = bool(todo)
        if _optimizes(job) and (todo or not ladder):   # all or nothing; the old ladder's records dropped
            outcome.kept, todo, redo = [], ladder_names(job, state), True
        if outcome.kept:
            _say(outcome, log, f"up to date: {', '.join(outcome.kept)}")
        if redo:
            whole = _optimizes(job) or len(todo) == len(ladder)
            _export(job, folder, todo, whole, expected, state, settings, outcome, log)
    outcome.seconds += time.perf_counter() - start
    return outcome


def _export(job, folder, todo, whole_ladder, expected, state, settings, outcome, log) -> None:
    from ..export import export
    from ..job import split_large_files
    from ..sizes import format_size, parse_size

    for quant in todo:            # a record that no longer holds is dropped before the redo
        state.forget_file(quant)
    state.data.setdefault("skipped", {})
    source, options = export_options(job, folder, job.quants if whole_ladder else tuple(todo), settings)
    _say(outcome, log, f"exporting {', '.join(todo) or 'the optimized ladder'}")
    split_limit = parse_size(job.split_max_size) if job.split_max_size else None
    report = export(source, options, split_limit)
    splits = split_large_files(report.files, job.split_max_size, progress=False) if job.split_max_size else {}
    for f in report.files:
        paths = splits.get(f.path, [f.path])
        state.record_file(f.quant, expected, paths, type_label=f.type_label, n_params=f.n_params,
                          seconds=f.seconds)
        outcome.made.append(f.quant)
    for quant, reason in report.skipped.items():
        state.data["skipped"][quant] = {"fingerprint": expected, "reason": reason}
    if _optimizes(job) and not report.failed:   # what it wrote is the ladder from now on
        state.data["ladder"] = {"fingerprint": expected, "names": [f.quant for f in report.files]}
    state.save()
    outcome.failed.update(report.failed)
    made = ", ".join(f"{f.type_label} {format_size(f.bytes)}" for f in report.files)
    _say(outcome, log, f"exported {made} in {report.seconds:.1f} s")
    for quant, reason in report.failed.items():
        _say(outcome, log, f"{quant} failed: {reason}")


def export_options(job: ModelJob, folder: Path, quants: tuple[str, ...], settings: RunSettings):
    """The source folder (downloaded when a hub id) and the ExportOptions of ``job``, made by
    ``export``'s own builder from every export option the job holds."""
    from ..export import options_from

    given = {key: getattr(job, key) for key in EXPORT_SETTINGS}
    given.update(quants=tuple(quants), threads=job.threads or settings.threads)
    return options_from(job.source, folder, quiet=settings.quiet, **given)


# Export options that change how the work runs, never the bytes written.
_NOT_IN_BYTES = ("threads", "force")


def export_fingerprint(job: ModelJob) -> str:
    """What the bytes of the files depend on: the source and the files it names as they are now,
    and every other export setting."""
    return fingerprint({
        "shortquant": __version__, "source": source_identity(job.source),
        **{key: source_identity(getattr(job, key)) if getattr(job, key) else None for key in ("imatrix", "calib")},
        **{key: getattr(job, key) for key in EXPORT_SETTINGS if key not in _NOT_IN_BYTES + ("imatrix", "calib")},
        "split_max_size": job.split_max_size})


def _optimizes(job: ModelJob) -> bool:
    return job.optimize or job.target_bpw is not None or job.target_size is not None


def ladder_names(job: ModelJob, state: ModelState, expected: str | None = None) -> list[str]:
    """The types (file names' keys) of the job's ladder, in order: its --quant types; for an
    optimizing job, what its last export wrote (``expected``: only if made with that fingerprint)."""
    from ..quant.types import parse_quants

    if _optimizes(job):
        record = state.data.get("ladder") or {}
        return list(record.get("names", [])) if expected in (None, record.get("fingerprint")) else []
    return [spec.name for spec in parse_quants(list(job.quants))]


def source_identity(source: str) -> object:
    """A local folder or file by its files' names, sizes and modification times (cheap to
    compare, changes when the checkpoint is replaced); a hub id by its name."""
    path = Path(source)
    if path.is_file():
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]
    if path.is_dir():
        return [str(path), sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                  for p in path.iterdir() if p.is_file())]
    return source


# -- evaluate ------------------------------------------------------------------------------

def evaluate_step(job: ModelJob, out_root: str | Path, settings: RunSettings, outcome: ModelOutcome,
                  log: Log | None = None) -> ModelOutcome:
    """Measure the ladder (results.json, report.png) unless the same files were measured already."""
    if not job.eval or outcome.reason is not None:
        return outcome
    from ..job import JobSteps, evaluate_outputs

    folder = Path(out_root) / job.folder
    start = time.perf_counter()
    _note_node(outcome)
    with _guard(outcome, "evaluate", log):
        state = ModelState.load(folder)
        files = ladder_files(job, state)
        if not files:
            return outcome
        expected = fingerprint({"files": [state.data["files"][f.quant]["sha256"] for f in files],
                                "text": source_identity(job.text) if job.text else None, "ctx": job.ctx,
                                "base": source_identity(job.base) if job.base else None, "bench": job.bench})
        if state.step_done("eval", expected):
            _say(outcome, log, "evaluation up to date")
        else:
            state.forget_step("eval")
            state.forget_step("card")
            _say(outcome, log, f"evaluating {len(files)} files")
            source = _source_if_needed(job, files)
            steps = JobSteps(text=job.text, ctx=job.ctx, base=job.base, bench=job.bench)
            results = evaluate_outputs(files, source, folder, steps, threads=job.threads or settings.threads,
                                       quiet=settings.quiet)
            state.record_step("eval", expected, ["results.json"])
            state.save()
            ppl = ", ".join(f"{f['type']} {f['ppl']:.3f}" for f in results["files"] if f.get("ppl") is not None)
            _say(outcome, log, f"evaluated: PPL {ppl}")
    outcome.seconds += time.perf_counter() - start
    return outcome


def ladder_files(job: ModelJob, state: ModelState) -> list[ExportedFile]:
    """The finished files of the ladder, in ladder order (the first part of a split file)."""
    out = []
    for name in ladder_names(job, state):
        entry = state.data["files"].get(name)
        if entry:
            out.append(ExportedFile(path=state.folder / entry["paths"][0], quant=name,
                                    type_label=entry["type"], bytes=entry["bytes"], n_params=entry["n_params"],
                                    seconds=entry["seconds"]))
    return out


def _source_if_needed(job: ModelJob, files: list[ExportedFile]) -> Path:
    """The checkpoint, only when the KLD reference will be the checkpoint itself."""
    from ..export import resolve_source
    from ..job import BASE_PREFERENCE

    if job.base is None and not any(f.quant in BASE_PREFERENCE for f in files):
        return resolve_source(job.source)[0]
    return Path(job.source)


# -- finish: card and publish --------------------------------------------------------------

def finish_step(job: ModelJob, out_root: str | Path, settings: RunSettings, outcome: ModelOutcome,
                log: Log | None = None) -> ModelOutcome:
    """Write the card and publish when asked (only for a model without failures)."""
    folder = Path(out_root) / job.folder
    start = time.perf_counter()
    if outcome.ok and (job.card or settings.publish):
        with _guard(outcome, "card", log):
            _card(job, folder, settings, outcome, log)
    outcome.seconds += time.perf_counter() - start
    _note_node(outcome)
    with contextlib.suppress(Exception):   # the rows only describe; they never fail a model
        outcome.rows = catalogue_rows(job, ModelState.load(folder))
    return outcome


def catalogue_rows(job: ModelJob, state: ModelState) -> list[dict]:
    """One row per finished type: size, bpw, PPL and KLD (when measured), export seconds."""
    import json

    measured = {}
    results = state.folder / "results.json"
    if job.eval and state.data.get("eval") and results.is_file():
        measured = {f["file"]: f for f in json.loads(results.read_text())["files"]}
    rows = []
    for f in ladder_files(job, state):
        m = measured.get(f.path.name, {})
        kld = m.get("kld") or {}
        rows.append({"model": job.folder, "type": f.type_label, "file": f.path.name, "bytes": f.bytes,
                     "bpw": round(f.bpw, 4), "ppl": m.get("ppl"), "ppl_err": m.get("ppl_err"),
                     "kld": kld.get("mean"), "seconds": f.seconds})
    return rows


def _card(job, folder: Path, settings: RunSettings, outcome: ModelOutcome, log) -> None:
    from ..job import write_card_files
    from ..publish.upload import publish

    state = ModelState.load(folder)
    files = ladder_files(job, state)
    results = folder / "results.json"
    expected = fingerprint({"files": [state.data["files"][f.quant]["sha256"] for f in files],
                            "results": state.data.get("eval", {}).get("sha256"), "recipe": job.recipe,
                            "repo": job.repo, "has_results": results.is_file()})
    if job.card:
        if state.step_done("card", expected):
            _say(outcome, log, "card up to date")
        else:
            written = write_card_files(folder, job.recipe, progress=False, repo=job.repo)
            state.record_step("card", expected, [p.name for p in written])
            state.save()
            _say(outcome, log, f"card: {written[0].name} (+{len(written) - 1} ollama files)")
    if settings.publish and job.repo:
        published = fingerprint({"card": expected, "private": job.private})
        if not settings.dry_run and state.step_done("publish", published):
            _say(outcome, log, f"already published to {job.repo}")
            return
        result = publish(folder, job.repo, job.private, dry_run=settings.dry_run, progress=False)
        if settings.dry_run:
            _say(outcome, log, f"staged for {job.repo}: {len(result.files)} files in {result.staging_dir}")
        else:
            state.record_step("publish", published, repo=job.repo, url=result.url)
            state.save()
            _say(outcome, log, f"published to {result.url or job.repo}")


# -- helpers ---------------------------------------------------------------------------------

def _say(outcome: ModelOutcome, log: Log | None, text: str) -> None:
    outcome.steps.append(text)
    if log is not None:
        log(text)


@contextlib.contextmanager
def _guard(outcome: ModelOutcome, step: str, log: Log | None):
    """A failure of this model becomes its one-line reason; interrupts go through."""
    try:
        yield
    except ShortquantError as exc:
        outcome.reason = f"{step}: {_first_line(exc)}"
        _say(outcome, log, f"failed: {outcome.reason}")
    except Exception as exc:   # a bug: still only this model fails, and it says so
        if os.environ.get("SHORTQUANT_DEBUG"):
            raise
        outcome.reason = f"{step}: internal error: {type(exc).__name__}: {_first_line(exc)}"
        outcome.internal = True
        _say(outcome, log, f"failed: {outcome.reason}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _note_node(outcome: ModelOutcome) -> None:
    """Under Ray, record the node this step runs on."""
    import sys

    ray = sys.modules.get("ray")   # imported only inside a Ray worker (or a Ray driver)
    with contextlib.suppress(Exception):
        if ray is not None and ray.is_initialized():
            outcome.nodes.append(ray.get_runtime_context().get_node_id())
