"""The whole job for one model: export -> split -> evaluate -> card, as one library call.

``export`` (the CLI command) and ``batch`` both run it; each step is also a function of its
own, so a caller that resumes work (the batch runner) can run only the steps it still needs.

>>> from shortquant.export import ExportOptions, resolve_source
>>> source, recipe = resolve_source(None)                                           # doctest: +SKIP
>>> result = run_job(source, ExportOptions(quants=("f16", "q8_0"), out_dir=Path("out")),
...                  JobSteps(evaluate=True, ctx=128, card=True))                  # doctest: +SKIP
>>> sorted(f["type"] for f in result.results["files"])                            # doctest: +SKIP
['F16', 'Q8_0']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .export import ExportedFile, ExportOptions, ExportReport, export

# The KLD reference of an evaluation, when no --base is given: the widest file of the ladder.
BASE_PREFERENCE = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class JobSteps:
    """What happens after the export; the defaults do nothing more."""

    split_max_size: str | None = None   # e.g. "48G": larger files are replaced by split parts
    evaluate: bool = False              # perplexity, KLD, speed into OUT/results.json (+ report.png)
    text: Path | None = None            # evaluation text; None: the built-in text
    ctx: int = 512
    base: str | Path | None = None      # KLD reference; None: see BASE_PREFERENCE, else the source
    bench: bool = True                  # with evaluate: prompt and generation speed too
    card: bool = False                  # README.md and ollama Modelfiles in OUT


@dataclass
class JobResult:
    report: ExportReport
    splits: dict[Path, list[Path]] = field(default_factory=dict)   # first part -> all parts
    results: dict | None = None
    card: Path | None = None
    card_files: list[Path] = field(default_factory=list)           # README.md and the Modelfiles


def run_job(source: Path, options: ExportOptions, steps: JobSteps = JobSteps(),
            on_step: Callable[[str, JobResult], None] | None = None) -> JobResult:
    """Export ``source`` as ``options`` say, then split, evaluate and write the card as ``steps`` say.

    ``on_step(name, result)`` is called after "exported" (split included), "evaluated" and
    "card", so a caller can print each step's outcome as soon as it is known. The evaluation
    and the card cover the files this call made (a ladder that failed entirely raises).
    """
    notify = on_step or (lambda name, result: None)
    progress = not options.quiet
    from .errors import PublishError
    from .sizes import parse_size

    split_limit = parse_size(steps.split_max_size, PublishError, "--split-max-size") if steps.split_max_size else None
    report = export(source, options, split_limit)
    result = JobResult(report=report)
    if steps.split_max_size:
        result.splits = split_large_files(report.files, steps.split_max_size, progress=progress)
    notify("exported", result)
    if steps.evaluate and report.files:
        result.results = evaluate_outputs(report.files, source, options.out_dir, steps,
                                          threads=options.threads, quiet=options.quiet)
        notify("evaluated", result)
    if steps.card and report.files:
        result.card_files = write_card_files(options.out_dir, options.recipe, progress=progress)
        result.card = result.card_files[0]
        notify("card", result)
    return result


def split_large_files(files: Sequence[ExportedFile], max_size: str | int, *,
                      progress: bool = True) -> dict[Path, list[Path]]:
    """Replace each file over ``max_size`` by its split parts; its ``path`` becomes the first part."""
    from .errors import PublishError
    from .publish.split import split_gguf
    from .sizes import parse_size

    limit = parse_size(max_size, PublishError, "--split-max-size")
    splits = {}
    for f in files:
        if f.bytes <= limit:
            continue
        parts = split_gguf(f.path, limit, progress=progress)
        if len(parts) > 1:
            f.path.unlink()
            f.path = parts[0]
            splits[parts[0]] = parts
    return splits


def evaluation_base(files: Sequence[ExportedFile], source: Path, base: str | Path | None = None):
    """The KLD reference: ``base`` when given, else the f32/f16/bf16 file at hand, else the source."""
    if base is not None:
        return base
    exported = {f.quant: f.path for f in files}
    return next((exported[q] for q in BASE_PREFERENCE if q in exported), source)


def evaluate_outputs(files: Sequence[ExportedFile], source: Path, out_dir: Path, steps: JobSteps, *,
                     threads: int | None = None, quiet: bool = True) -> dict:
    """Perplexity, KLD and speed of ``files`` into ``out_dir/results.json``, and ``report.png``."""
    from .evaluate.report import plot_report
    from .evaluate.runner import evaluate_files

    out_dir = Path(out_dir)
    results = evaluate_files([f.path for f in files], steps.text, steps.ctx,
                             evaluation_base(files, source, steps.base), threads=threads, bench=steps.bench,
                             quiet=quiet, output=out_dir / "results.json")
    plot_report([results], out_dir / "report.png")
    return results


def write_card_files(out_dir: Path, recipe=None, *, progress: bool = True, repo: str | None = None) -> list[Path]:
    """README.md (with report.png when an evaluation made one) and the ollama Modelfiles."""
    from .publish.card import write_card
    from .publish.modelfile import write_modelfiles

    plot = Path(out_dir) / "report.png"
    readme = write_card(out_dir, recipe=recipe, plot=plot if plot.exists() else None, progress=progress,
                        repo=repo)
    return [readme, *write_modelfiles(out_dir)]
