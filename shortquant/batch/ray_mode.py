"""Ray mode: each model's ladder is a Ray task, its evaluation another, its card a third.

The tasks are the same three steps local mode runs (``shortquant.batch.steps``), chained by
passing each one's outcome to the next; they declare the CPUs and memory they need, so Ray
places them on nodes with room. Every node writes into the same output root, which must be
shared storage (NFS, a mounted bucket, ...), and needs the same shortquant installed. The
driver only submits the tasks and collects their outcomes.

    ray start --head                        # on the first node
    ray start --address HEAD:6379           # on each other node
    shortquant batch jobs.yaml --out /shared/catalogue --ray auto
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..errors import BackendError
from .jobsfile import ModelJob
from .local import EXPORT_MEMORY, job_memory
from .steps import ModelOutcome, RunSettings, evaluate_step, export_step, finish_step

# Threads of one export task when the jobs file sets none: quantization scales with threads,
# and four leaves room for several models on a typical node.
DEFAULT_TASK_CPUS = 4


def import_ray():
    try:
        import ray
    except ImportError:
        raise BackendError("--ray needs Ray: pip install 'shortquant[ray]' (or pip install ray)") from None
    return ray


def connect(address: str) -> bool:
    """Join the cluster at ``address`` ('auto': the one this machine belongs to; 'local': start a
    private one here). Returns whether this call started Ray (and so must shut it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR", configure_logging=False)
    except ConnectionError as exc:
        raise BackendError(f"cannot reach a Ray cluster at {address!r} ({_first_line(exc)}); "
                           "start one with `ray start --head` or use --ray local") from None
    except Exception as exc:   # a node that did not come up (timeouts under load, ports in use)
        raise BackendError(f"Ray did not start at {address!r}: {type(exc).__name__}: {_first_line(exc)}") from None
    return True


def largest_node_cpus(ray) -> int:
    return int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)) or 1


def run_ray(jobs: Sequence[ModelJob], out_root: Path, settings: RunSettings, address: str,
            on_event: Callable[[str, str], None], on_done: Callable[[ModelOutcome], None]) -> list[ModelOutcome]:
    """Submit every model's chain of tasks, report each step as its task ends, return the outcomes."""
    ray = import_ray()
    started = connect(address)
    try:
        return _run(ray, jobs, str(Path(out_root).resolve()), settings, on_event, on_done)
    finally:
        if started:
            ray.shutdown()


def _run(ray, jobs, out_root: str, settings: RunSettings, on_event, on_done) -> list[ModelOutcome]:
    export_task, eval_task, finish_task = (ray.remote(export_step), ray.remote(evaluate_step),
                                           ray.remote(finish_step))
    node_cpus = largest_node_cpus(ray)
    stage_of, final_of, printed = {}, {}, {}
    for job in jobs:
        cpus = min(job.threads or settings.threads or DEFAULT_TASK_CPUS, node_cpus)
        task_settings = RunSettings(threads=cpus, quiet=True, publish=settings.publish, dry_run=settings.dry_run)
        ref = export_task.options(num_cpus=cpus, memory=EXPORT_MEMORY, name=f"export {job.folder}").remote(
            job, out_root, task_settings)
        stage_of[ref] = job
        if job.eval:
            ref = eval_task.options(num_cpus=cpus, memory=job_memory(job), name=f"eval {job.folder}").remote(
                job, out_root, task_settings, ref)
            stage_of[ref] = job
        ref = finish_task.options(num_cpus=1, name=f"card {job.folder}").remote(job, out_root, task_settings, ref)
        stage_of[ref] = job
        final_of[job.folder] = ref
        printed[job.folder] = 0
        on_event(job.folder, f"submitted ({cpus} CPUs)")
    outcomes: dict[str, ModelOutcome] = {}
    pending = list(stage_of)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                job = stage_of[ref]
                if job.folder in outcomes:
                    continue
                try:
                    outcome = ray.get(ref)
                except Exception as exc:   # the task's process died, or Ray failed it
                    outcome = _lost(job, exc)
                for text in outcome.steps[printed[job.folder]:]:
                    on_event(job.folder, text)
                printed[job.folder] = len(outcome.steps)
                if ref == final_of[job.folder]:     # an earlier task lost fails this one too
                    outcomes[job.folder] = outcome
                    on_done(outcome)
    except BaseException:
        for ref in pending:           # an interrupted driver: the tasks clean up like Ctrl-C
            ray.cancel(ref)
        raise
    return [outcomes[job.folder] for job in jobs]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _lost(job: ModelJob, exc: Exception) -> ModelOutcome:
    first = _first_line(exc)
    return ModelOutcome(folder=job.folder, source=job.source, internal=True,
                        reason=f"Ray task failed: {type(exc).__name__}: {first[:200]}")
