"""``shortquant batch``: the click command (registered by ``shortquant.cli``)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click


@click.command("batch")
@click.argument("jobs_file", metavar="JOBS.yaml", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_root", type=click.Path(path_type=Path), required=True,
              help="Output root; each model gets a folder of its own in it.")
@click.option("--ray", "ray_address", metavar="auto|local|ADDRESS",
              help="Run on Ray: 'auto' joins this machine's cluster, 'local' starts one here, or a head "
                   "address. The output root must be shared by every node. Needs `pip install ray`.")
@click.option("--jobs", "-j", "workers", type=click.IntRange(min=1),
              help="Local mode: models at once [default: as many as cores and memory allow; 1: one after "
                   "another].")
@click.option("--publish", is_flag=True, help="Upload each finished model folder to its 'repo' (needs card: true).")
@click.option("--dry-run", is_flag=True, help="With --publish: stage the uploads under OUT, no network.")
@click.option("--quiet", is_flag=True, help="No progress; only the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def batch_command(jobs_file, out_root, ray_address, workers, publish, dry_run, quiet, as_json):
    """Convert a catalogue: every model of JOBS.yaml to its ladder, each into OUT/<model>/.

    Finished files are recorded with their sha256 in OUT/<model>/.shortquant-batch.json; running
    the same command again skips them and redoes only what is missing, changed or corrupt. A
    model that fails does not stop the others; the summary (OUT/catalogue.md and .json) names
    it, and the exit code is non-zero.

    \b
    JOBS.yaml (top-level settings are defaults a model may override):
      quants: [q8_0, q4_k_m]
      eval: true            # PPL, KLD, speed per model
      card: true            # README.md + Modelfiles per model
      repo: me/{folder}-GGUF
      models:
        - source: ./st-vicuna-v1.3-5.5b-taylor
        - source: nota-ai/st-llama-1-5.5b-ppl
          quants: [q4_k_m]

    \b
    Examples:
      shortquant batch jobs.yaml --out ./catalogue
      shortquant batch jobs.yaml --out /shared/catalogue --ray auto
      shortquant batch jobs.yaml --out ./catalogue --publish --dry-run
    """
    from ..signals import handle_termination
    from .jobsfile import JobsFileError, check_publish, load_jobs
    from .run import run_batch

    try:
        catalogue = load_jobs(jobs_file)
        if publish:
            check_publish(catalogue)
    except JobsFileError as exc:
        for line in exc.problems:
            click.echo(f"error: {line}", err=True)
        sys.exit(2)
    if dry_run and not publish:
        raise click.UsageError("--dry-run goes with --publish")
    if ray_address is not None and workers is not None:
        raise click.UsageError("--jobs is for local mode; on Ray, set 'threads' per model in the jobs file")

    silent = quiet or as_json
    # SIGTERM/SIGHUP interrupt like Ctrl-C: pool workers and Ray tasks are stopped and clean up.
    with handle_termination(), _ray_session(ray_address):   # Ray joined before any progress shows
        progress = _Progress(len(catalogue.models), silent)
        try:
            report = run_batch(catalogue, out_root, workers=workers, ray=ray_address, publish=publish,
                               dry_run=dry_run, quiet=silent, on_event=progress.event, on_done=progress.done)
        finally:
            progress.close()
    if as_json:
        click.echo(json.dumps(json.loads(report.summary_json.read_text()), indent=2))
    elif not quiet:
        click.echo(report.summary_md.read_text(), nl=False)
    ok = len(report.outcomes) - len(report.failed)
    if not as_json:
        click.echo(f"{len(report.outcomes)} models: {ok} finished, {len(report.failed)} failed, "
                   f"in {report.seconds:.1f} s, {report.mode}; summary in {report.summary_md}", err=True)
    for outcome in report.failed:
        reasons = ([outcome.reason] if outcome.reason else []) + [f"{q}: {r}" for q, r in outcome.failed.items()]
        click.echo(f"error: {outcome.folder}: {'; '.join(reasons)}", err=True)
    if report.exit_code:
        sys.exit(report.exit_code)


@contextlib.contextmanager
def _ray_session(address: str | None):
    """Join (or start) Ray for the run when asked, and leave it as found."""
    if address is None:
        yield
        return
    from .ray_mode import connect, import_ray

    started = connect(address)
    try:
        yield
    finally:
        if started:
            import_ray().shutdown()


class _Progress:
    """One overall bar (models done) and one line per step of each model, on stderr."""

    def __init__(self, total: int, silent: bool):
        from tqdm import tqdm

        self.silent = silent
        self.bar = tqdm(total=total, desc="batch", unit="model", disable=silent, file=sys.stderr)

    def event(self, folder: str, text: str) -> None:
        if not self.silent:
            self.bar.write(f"{folder}: {text}", file=sys.stderr)

    def done(self, outcome) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
