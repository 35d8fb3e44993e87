"""The jobs file of ``shortquant batch``: read, check every entry up front, resolve the defaults.

A jobs file is YAML. Top-level settings are defaults; a model entry may override any of them::

    quants: [q8_0, q4_k_m]          # the ladder of every model
    eval: true                      # perplexity, KLD, speed per model (results.json)
    bench: false                    # ... but no speed runs
    ctx: 512
    card: true                      # README.md + ollama Modelfiles per model
    license: apache-2.0             # ... and any other option of `shortquant export`, spelled
    pad_ffn: 0                      #     without the dashes (--pad-ffn: pad_ffn)
    repo: me/{folder}-GGUF          # hub repo per model, for --publish
    models:
      - source: ./st-vicuna-v1.3-5.5b-taylor      # a folder (relative to this file) or a hub id
      - source: nota-ai/st-llama-1-5.5b-ppl
        quants: [q4_k_m]
        folder: st-llama-ppl                      # output folder under --out (default: the source's name)

Every problem found is reported, one line each, before any work starts.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QuantError, ShortquantError
from ..export import EXPORT_SETTINGS, default_quants, optimize_request
from ..quant.probe import PROBE_FROM
from ..hub import check_repo_id, is_hub_id

# Settings allowed at the top level (defaults) and in each model entry, with their defaults:
# every option of `export` (its one table), then what the later steps take.
DEFAULTS = {
    **EXPORT_SETTINGS,
    "eval": False,
    "bench": True,
    "text": None,
    "ctx": 512,
    "base": None,
    "split_max_size": None,
    "card": False,
    "repo": None,
    "private": False,
}
MODEL_ONLY = ("source", "folder")
_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PATTERN_FIELDS = {"folder", "name", "source"}   # what a repo pattern may use: me/{folder}-GGUF


class JobsFileError(ShortquantError):
    """The jobs file has problems; ``problems`` holds one line for each."""

    def __init__(self, path: Path, problems: list[str]):
        self.problems = [f"{path}: {p}" for p in problems]
        super().__init__("; ".join(problems), path)


@dataclass(frozen=True)
class ModelJob:
    """One model of the catalogue with every setting resolved: plain values, so it pickles
    into a process pool or a Ray task unchanged."""

    index: int
    source: str                     # absolute folder path, or a hub id
    folder: str                     # output folder name under --out
    quants: tuple[str, ...]
    recipe: str | None = None
    name: str | None = None
    source_blocks: str | None = None
    remove_blocks: str | None = None
    chat_template: str | None = None
    imatrix: str | None = None
    output_type: str | None = None
    embedding_type: str | None = None
    tensor_types: tuple[str, ...] = ()
    pure: bool = False
    allow_nonfinite: bool = False
    threads: int | None = None
    eval: bool = False
    bench: bool = True                  # with eval: speed too
    text: str | None = None
    ctx: int = 512
    base: str | None = None
    split_max_size: str | None = None
    card: bool = False
    repo: str | None = None
    private: bool = False
    pre: str | None = None
    pad_ffn: int | None = None
    base_model: str | None = None
    license: str | None = None
    optimize: bool = False
    target_bpw: float | tuple[float, ...] | None = None
    target_size: str | None = None
    calib: str | None = None
    force: bool = False
    probe_from: str = "auto"
    optimize_keep: str | None = None


@dataclass
class Catalogue:
    path: Path
    models: list[ModelJob] = field(default_factory=list)


def load_jobs(path: str | Path) -> Catalogue:
    """Read and check ``path``; raise :class:`JobsFileError` listing every problem found."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobsFileError(path, ["no such file"]) from None
    except IsADirectoryError:
        raise JobsFileError(path, ["is a folder, not a jobs file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobsFileError(path, [f"cannot read ({getattr(exc, 'strerror', None) or exc})"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise JobsFileError(path, [f"{where}not valid YAML ({problem})"]) from None
    problems: list[str] = []
    models = _models(data, path.resolve().parent, problems)
    if problems:
        raise JobsFileError(path, problems)
    return Catalogue(path=path, models=models)


def _models(data, base_dir: Path, problems: list[str]) -> list[ModelJob]:
    if not isinstance(data, dict):
        problems.append("expected a mapping with a 'models' list at the top level")
        return []
    _unknown_keys(data, set(DEFAULTS) | {"models"}, "", problems)
    own = {key: data[key] for key in DEFAULTS if key in data}
    defaults = {**DEFAULTS, **_check_settings(own, base_dir, lambda key, text: problems.append(f"{key}: {text}"))}
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        problems.append("'models' must be a non-empty list of entries with a 'source'")
        return []
    jobs, folders = [], {}
    for index, entry in enumerate(entries):
        where = f"models[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping with a 'source'")
            continue
        _unknown_keys(entry, set(DEFAULTS) | set(MODEL_ONLY), f"{where}.", problems)
        job = _model_job(index, entry, defaults, base_dir, where, problems)
        if job is None:
            continue
        if job.folder in folders:
            problems.append(f"{where}: output folder {job.folder!r} is also that of models[{folders[job.folder]}] "
                            "(set 'folder' on one of them)")
        folders.setdefault(job.folder, index)
        jobs.append(job)
    return jobs


def _unknown_keys(mapping: dict, allowed: set[str], prefix: str, problems: list[str]) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{prefix}{key}: unknown setting{hint}")


def _model_job(index: int, entry: dict, defaults: dict, base_dir: Path, where: str,
               problems: list[str]) -> ModelJob | None:
    before = len(problems)

    def problem(key: str, text: str) -> None:
        problems.append(f"{where}.{key}: {text}")

    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        problem("source", "missing; a checkpoint folder or a hub id (org/name)")
        return None
    source_path = (base_dir / source).resolve() if not Path(source).is_absolute() else Path(source)
    if source_path.is_dir():
        source = str(source_path)
        default_folder = source_path.name
    elif is_hub_id(source):
        default_folder = source.split("/", 1)[1]
    else:
        problem("source", f"no such folder, and not a hub id: {source}")
        return None
    folder = entry.get("folder", default_folder)
    if not isinstance(folder, str) or not _FOLDER.match(folder):
        problem("folder", f"{folder!r} is not a plain folder name (letters, digits, '.', '_', '-')")
    own = {key: entry[key] for key in DEFAULTS if key in entry}
    s = {**defaults, **_check_settings(own, base_dir, problem)}
    if len(problems) > before:
        return None
    try:   # export's own rule: --calib with, and only with, --optimize or a target
        optimize_request(s["optimize"], s["target_bpw"], s["target_size"], s["calib"], s["probe_from"],
                         s["optimize_keep"])
    except ShortquantError as exc:
        problem("calib", str(exc))
        return None
    repo = None
    if s["repo"] is not None:
        fields = {"folder": folder, "name": s["name"] or folder, "source": default_folder}
        repo = _repo(s["repo"], fields, problem)
    if len(problems) > before:
        return None
    return ModelJob(
        index=index, source=source, folder=folder, recipe=s["recipe"], name=s["name"],
        quants=default_quants(s["quants"], s["target_bpw"], s["target_size"]),
        source_blocks=_blocks_text(s["source_blocks"]), remove_blocks=_blocks_text(s["remove_blocks"]), chat_template=s["chat_template"], imatrix=s["imatrix"],
        output_type=s["output_type"], embedding_type=s["embedding_type"], tensor_types=tuple(s["tensor_types"]),
        pure=s["pure"], allow_nonfinite=s["allow_nonfinite"], threads=s["threads"], eval=s["eval"],
        bench=s["bench"], text=s["text"], ctx=s["ctx"], base=s["base"],
        split_max_size=None if s["split_max_size"] is None else str(s["split_max_size"]), card=s["card"],
        repo=repo, private=s["private"], pre=s["pre"], pad_ffn=s["pad_ffn"], base_model=s["base_model"],
        license=s["license"], optimize=s["optimize"],
        target_bpw=tuple(s["target_bpw"]) if isinstance(s["target_bpw"], list) else s["target_bpw"],
        target_size=None if s["target_size"] is None else str(s["target_size"]), calib=s["calib"], force=s["force"],
        probe_from=s["probe_from"],
        optimize_keep=",".join(s["optimize_keep"]) if isinstance(s["optimize_keep"], list) else s["optimize_keep"])


def _check_settings(values: dict, base_dir: Path, problem) -> dict:
    """Check the settings given at one level (the top, or one model); return them with paths
    resolved against the jobs file's folder. Values with problems are left out."""
    out = dict(values)
    if "quants" in values:
        out["quants"] = _quants(values["quants"], problem)
    for key in ("pure", "allow_nonfinite", "eval", "bench", "card", "private", "optimize", "force"):
        if key in values and not isinstance(values[key], bool):
            problem(key, f"expected true or false, not {values[key]!r}")
    if values.get("threads") is not None and not _whole(values["threads"], 1):
        problem("threads", f"expected a whole number >= 1, not {values['threads']!r}")
    if "ctx" in values and not _whole(values["ctx"], 8):
        problem("ctx", f"expected a whole number >= 8, not {values['ctx']!r}")
    if values.get("pad_ffn") is not None and not _whole(values["pad_ffn"], 0):
        problem("pad_ffn", f"expected a whole number >= 0, not {values['pad_ffn']!r}")
    bpw = values.get("target_bpw")
    if bpw is not None and not all(not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v <= 32
                                   for v in (bpw if isinstance(bpw, list) and bpw else [bpw])):
        problem("target_bpw", f"expected bits per weight between 0 and 32 (or a list of them), not {bpw!r}")
    if "probe_from" in values and values["probe_from"] not in PROBE_FROM:
        problem("probe_from", f"expected one of {', '.join(PROBE_FROM)}, not {values['probe_from']!r}")
    for key in ("recipe", "name", "chat_template", "output_type", "embedding_type", "pre", "base_model", "license"):
        if values.get(key) is not None and not isinstance(values[key], str):
            problem(key, f"expected text, not {values[key]!r}")
    if "tensor_types" in values and (not isinstance(values["tensor_types"], list)
                                     or not all(isinstance(t, str) for t in values["tensor_types"])):
        problem("tensor_types", "expected a list like ['ffn_down=q6_k']")
    else:
        _check_overrides(values, problem)
    _check_names(values, problem)
    for key in ("imatrix", "text", "calib"):
        if values.get(key) is not None:
            out[key] = _existing_file(values[key], base_dir, key, problem)
    if values.get("base") is not None:
        base = _existing_path(values["base"], base_dir, "base", problem)
        out["base"] = str(base) if base else None
    if values.get("repo") is not None:
        _repo(values["repo"], {f: "x" for f in _PATTERN_FIELDS}, problem)   # the pattern itself
    return out


def _whole(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _quants(value, problem) -> tuple[str, ...]:
    from ..errors import QuantError
    from ..quant.types import parse_quants

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(q, str) for q in value):
        problem("quants", "expected a non-empty list of type names, e.g. [q8_0, q4_k_m]")
        return ()
    try:
        parse_quants(list(value))
    except QuantError as exc:
        problem("quants", str(exc))
    return tuple(value)


def _check_names(values: dict, problem) -> None:
    """The settings that name something that must exist: recipe, chat template, blocks, size."""
    if isinstance(values.get("recipe"), str):
        from ..recipes import RecipeError, load_recipe

        try:
            load_recipe(values["recipe"])
        except RecipeError as exc:
            problem("recipe", str(exc))
    if isinstance(values.get("chat_template"), str):
        from ..chat_templates import chat_template

        try:
            chat_template(values["chat_template"])
        except ShortquantError as exc:
            problem("chat_template", str(exc))
    for key in ("source_blocks", "remove_blocks"):
        if values.get(key) is not None:
            from ..layers import parse_block_list

            try:
                parse_block_list(_blocks_text(values[key]))
            except (ValueError, TypeError):
                problem(key, f"{values[key]!r} is not a list like '0-23,30,31'")
    from ..sizes import parse_size

    for key, error in (("split_max_size", ShortquantError), ("target_size", QuantError)):
        if values.get(key) is not None:
            try:
                parse_size(str(values[key]), error)
            except ShortquantError as exc:
                problem(key, str(exc))


def _check_overrides(values: dict, problem) -> None:
    from ..quant.mixes import QuantOverrides

    if not all(isinstance(values.get(k) or "", str) for k in ("output_type", "embedding_type")):
        return
    try:
        QuantOverrides.parse(output_type=values.get("output_type"), embedding_type=values.get("embedding_type"),
                             tensor_types=list(values.get("tensor_types") or [])).compiled()
    except ShortquantError as exc:
        problem("tensor_types" if values.get("tensor_types") else "output_type", str(exc))


def _blocks_text(value) -> str | None:
    """``source_blocks`` as the CLI's text form; YAML may give a list of numbers."""
    if value is None:
        return None
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _existing_path(value, base_dir: Path, key: str, problem) -> Path | None:
    if not isinstance(value, str):
        problem(key, f"expected a path, not {value!r}")
        return None
    path = Path(value) if Path(value).is_absolute() else (base_dir / value).resolve()
    if not path.exists():
        problem(key, f"no such file: {value}")
        return None
    return path


def _existing_file(value, base_dir: Path, key: str, problem) -> str | None:
    if value is None:
        return None
    path = _existing_path(value, base_dir, key, problem)
    if path is not None and not path.is_file():
        problem(key, f"not a file: {value}")
        return None
    return str(path) if path else None


def _repo(pattern, fields: dict, problem) -> str | None:
    """The hub repo of one model from a pattern such as ``me/{folder}-GGUF``."""
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        problem("repo", f"expected a repo id or pattern such as 'me/{{folder}}-GGUF', not {pattern!r}")
        return None
    try:
        repo = pattern.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        problem("repo", f"bad pattern {pattern!r} ({type(exc).__name__}: {exc}); "
                        f"it may use {', '.join('{' + f + '}' for f in sorted(_PATTERN_FIELDS))}")
        return None
    try:
        return check_repo_id(repo)
    except ShortquantError as exc:
        problem("repo", str(exc))
        return None


def check_publish(catalogue: Catalogue) -> None:
    """``--publish`` needs a repo and a card for every model; raise listing each one without."""
    problems = []
    for job in catalogue.models:
        if not job.repo:
            problems.append(f"models[{job.index}]: --publish needs 'repo' (e.g. repo: me/{{folder}}-GGUF)")
        if not job.card:
            problems.append(f"models[{job.index}]: --publish needs 'card: true' (the hub page)")
    if problems:
        raise JobsFileError(catalogue.path, problems)
