"""``shortquant batch``: a catalogue of models, each to a ladder of types, resumable, locally or on Ray.

- ``jobsfile``: the YAML jobs file, checked up front, defaults resolved into ``ModelJob``s;
- ``state``: the per-model state file (finished files and their sha256);
- ``steps``: one model's export, evaluation and card/publish, each resumable;
- ``local`` / ``ray_mode``: who runs the steps; ``run``: the driver and the catalogue summary.
"""

from .jobsfile import Catalogue, JobsFileError, ModelJob, load_jobs
from .run import BatchReport, run_batch

__all__ = ["BatchReport", "Catalogue", "JobsFileError", "ModelJob", "load_jobs", "run_batch"]
