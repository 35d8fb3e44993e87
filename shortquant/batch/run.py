"""``run_batch``: every model of a catalogue, locally or on Ray, then the catalogue summary.

>>> from shortquant.batch import load_jobs, run_batch
>>> report = run_batch(load_jobs("jobs.yaml"), "catalogue")            # doctest: +SKIP
>>> [o.folder for o in report.outcomes if not o.ok]                     # doctest: +SKIP
[]
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import OutputError
from ..partfiles import write_atomic
from .jobsfile import Catalogue
from .steps import ModelOutcome, RunSettings

SUMMARY_MD = "catalogue.md"
SUMMARY_JSON = "catalogue.json"


@dataclass
class BatchReport:
    outcomes: list[ModelOutcome]
    mode: str
    seconds: float
    summary_md: Path | None = None
    summary_json: Path | None = None

    @property
    def failed(self) -> list[ModelOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def exit_code(self) -> int:
        """0 all finished; 2 some model failed on its input; 1 some failure was internal."""
        if not self.failed:
            return 0
        return 1 if any(o.internal for o in self.failed) else 2


def run_batch(catalogue: Catalogue, out_root: str | Path, *, workers: int | None = None, ray: str | None = None,
              publish: bool = False, dry_run: bool = False, quiet: bool = True,
              on_event: Callable[[str, str], None] | None = None,
              on_done: Callable[[ModelOutcome], None] | None = None) -> BatchReport:
    """Run every model of ``catalogue`` into ``out_root/<folder>`` and write the summary there.

    ``ray`` None runs locally with ``workers`` processes (None: sized to the cores and memory;
    1: one after another, in this process); otherwise it is a Ray address ('auto', 'local',
    'ray://head:10001', ...). Finished, intact work is skipped (see ``batch.state``).
    """
    from .local import plan_workers, run_local

    out_root = Path(out_root)
    _prepare(out_root)
    on_event = on_event or (lambda folder, text: None)
    on_done = on_done or (lambda outcome: None)
    start = time.perf_counter()
    jobs = catalogue.models
    if ray is not None:
        from .ray_mode import run_ray

        settings = RunSettings(quiet=True, publish=publish, dry_run=dry_run)
        outcomes, mode = run_ray(jobs, out_root, settings, ray, on_event, on_done), f"ray ({ray})"
    else:
        n, threads = plan_workers(jobs, workers)
        settings = RunSettings(threads=threads, quiet=quiet or n > 1, publish=publish, dry_run=dry_run)
        outcomes = run_local(jobs, out_root, settings, n, on_event, on_done)
        mode = f"local ({n} process{'es' if n > 1 else ''} x {threads} threads)"
    report = BatchReport(outcomes=outcomes, mode=mode, seconds=time.perf_counter() - start)
    report.summary_md, report.summary_json = write_summary(report, catalogue, out_root)
    return report


def _prepare(out_root: Path) -> None:
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        if not os.access(out_root, os.W_OK):
            raise OutputError("output folder is not writable", out_root)
    except FileExistsError:
        raise OutputError("output path exists and is not a folder", out_root) from None
    except OSError as exc:
        raise OutputError(f"cannot create the output folder ({exc.strerror or exc})", out_root) from None


# -- summary ------------------------------------------------------------------------------

def summary_data(report: BatchReport, catalogue: Catalogue) -> dict:
    return {
        "jobs": str(catalogue.path), "mode": report.mode, "seconds": round(report.seconds, 3),
        "models": [{"folder": o.folder, "source": o.source, "status": "ok" if o.ok else "failed",
                    "reason": o.reason, "failed_types": o.failed, "made": o.made, "kept": o.kept,
                    "seconds": round(o.seconds, 3), "nodes": sorted(set(o.nodes)), "files": o.rows} for o in report.outcomes],
    }


def markdown_summary(data: dict) -> str:
    """The catalogue table: model x type with size, bpw, PPL, KLD and export seconds."""
    from ..sizes import format_size

    lines = ["| model | type | size | bpw | PPL | KLD | seconds |", "|---|---|---:|---:|---:|---:|---:|"]
    for model in data["models"]:
        for row in model["files"]:
            ppl = "" if row["ppl"] is None else f"{row['ppl']:.4f} ± {row['ppl_err']:.4f}"
            kld = "" if row["kld"] is None else f"{row['kld']:.6f}"
            lines.append(f"| {model['folder']} | {row['type']} | {format_size(row['bytes'])} | {row['bpw']:.2f} "
                         f"| {ppl} | {kld} | {row['seconds']:.1f} |")
    failed = [m for m in data["models"] if m["status"] != "ok"]
    if failed:
        lines += ["", "Failed:", ""]
        for m in failed:
            reasons = [m["reason"]] if m["reason"] else []
            reasons += [f"{q}: {r}" for q, r in m["failed_types"].items()]
            lines.append(f"- {m['folder']}: {'; '.join(reasons)}")
    return "\n".join(lines) + "\n"


def write_summary(report: BatchReport, catalogue: Catalogue, out_root: Path) -> tuple[Path, Path]:
    data = summary_data(report, catalogue)
    written = []
    for name, text in ((SUMMARY_MD, markdown_summary(data)), (SUMMARY_JSON, json.dumps(data, indent=2) + "\n")):
        target = out_root / name
        written.append(write_atomic(target, text))
    return written[0], written[1]
