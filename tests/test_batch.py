"""`shortquant batch` in local mode: the jobs file, a catalogue with a failing model, resume.

The catalogue is three tiny transformers checkpoints (one with a NaN weight, whose export must
fail) and the embedded demo model. Batch outputs are compared byte for byte with what
`shortquant export` writes for the same source, so a batch is the same conversion, only scheduled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from batch_helpers import INIT, gguf_bytes, make_checkpoints, write_jobs
from shortquant.batch import load_jobs, run_batch
from shortquant.batch.jobsfile import JobsFileError
from shortquant.batch.local import plan_workers
from shortquant.batch.state import STATE_FILE, ModelState
from shortquant.cli import main
from shortquant.export import resolve_source

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, small_tokenizer):
    return make_checkpoints(tmp_path_factory.mktemp("ckpt"), small_tokenizer)


@pytest.fixture(scope="module")
def demo():
    return resolve_source(None)[0]


def catalogue_jobs(folder: Path, checkpoints: dict[str, Path], extra: str = "") -> Path:
    return write_jobs(folder / "jobs.yaml", f"""
quants: [f16, q8_0, q4_0]
{extra}
models:
  - source: {checkpoints['tiny-a']}
  - source: {checkpoints['tiny-nan']}
  - source: {checkpoints['tiny-b']}
    quants: [q8_0, q4_k_m]
""")


def invoke(*args):
    return CliRunner().invoke(main, ["batch", *map(str, args)])


# -- the jobs file -------------------------------------------------------------------------------

def test_jobs_file_defaults_and_overrides(tmp_path, checkpoints):
    (tmp_path / "models").mkdir()
    link = tmp_path / "models" / "st-vicuna-v1.3-5.5b-taylor"
    link.symlink_to(checkpoints["tiny-a"])
    jobs = write_jobs(tmp_path / "jobs.yaml", """
quants: [q8_0, q4_k_m]
ctx: 128
repo: me/{folder}-GGUF
models:
  - source: models/st-vicuna-v1.3-5.5b-taylor
  - source: nota-ai/st-llama-1-5.5b-ppl
    quants: [q4_k_m]
    ctx: 256
    folder: ppl
    repo: other/fixed-name
""")
    first, second = load_jobs(jobs).models
    assert first.source == str(link.resolve()) and first.folder == "tiny-a"   # relative to the jobs file
    assert (first.quants, first.ctx, first.repo) == (("q8_0", "q4_k_m"), 128, "me/tiny-a-GGUF")
    assert (second.source, second.folder) == ("nota-ai/st-llama-1-5.5b-ppl", "ppl")   # a hub id, not fetched
    assert (second.quants, second.ctx, second.repo) == (("q4_k_m",), 256, "other/fixed-name")


def test_jobs_file_every_problem_one_line_and_nothing_written(tmp_path, checkpoints):
    jobs = write_jobs(tmp_path / "jobs.yaml", f"""
quant: [q8_0]
ctx: 4
repo: "me/{{nope}}"
models:
  - source: {checkpoints['tiny-a']}
    quants: [q9_9]
  - source: ./not-here
  - source: {checkpoints['tiny-a']}
    eval: maybe
    text: missing.txt
  - source: {checkpoints['tiny-b']}
    recipe: no-such-release
    split_max_size: 12X
""")
    out = tmp_path / "out"
    result = invoke(jobs, "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert all(line.startswith(f"error: {jobs}: ") for line in lines), lines
    text = "\n".join(lines)
    for expected in ("quant: unknown setting (did you mean 'quants'?)", "models[0].quants:", "q9_9",
                     "models[1].source: no such folder", "models[2].eval: expected true or false",
                     "models[2].text: no such file", "models[3].recipe:", "models[3].split_max_size:",
                     "ctx: expected a whole number >= 8", "repo: bad pattern"):
        assert expected in text, (expected, text)
    assert sum("ctx:" in line for line in lines) == 1   # a bad default is reported once, not per model
    assert len(lines) == 9   # one per problem above ("q9_9" is in the quants line)
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("text, problem", [
    ("models: [\n  - source: x\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("quants: [q8_0]\n", "'models' must be a non-empty list"),
])
def test_jobs_file_shapes(tmp_path, text, problem):
    jobs = write_jobs(tmp_path / "jobs.yaml", text)
    with pytest.raises(JobsFileError) as info:
        load_jobs(jobs)
    assert len(info.value.problems) == 1 and problem in info.value.problems[0]


def test_two_models_into_one_folder_is_a_problem(tmp_path, checkpoints):
    jobs = write_jobs(tmp_path / "jobs.yaml", f"""
models:
  - source: {checkpoints['tiny-a']}
  - source: {checkpoints['tiny-a']}
""")
    with pytest.raises(JobsFileError, match="output folder 'tiny-a' is also that of models\\[0\\]"):
        load_jobs(jobs)


def test_workers_sized_by_cores_and_memory(tmp_path, checkpoints):
    jobs = load_jobs(catalogue_jobs(tmp_path, checkpoints, "eval: true")).models
    gib = 1024 ** 3
    assert plan_workers(jobs, cores=8, memory=64 * gib) == (3, 2)       # no more processes than models
    assert plan_workers(jobs, cores=8, memory=1 * gib) == (1, 8)        # memory allows one at a time
    assert plan_workers(jobs, cores=2, memory=64 * gib) == (2, 1)
    assert plan_workers(jobs, 1, cores=2, memory=64 * gib) == (1, 2)    # --jobs 1: one after another


# -- a catalogue with a failing model --------------------------------------------------------------

@pytest.fixture(scope="module")
def local_run(tmp_path_factory, checkpoints):
    """The catalogue run once by the CLI in local mode (two processes), with eval and card."""
    root = tmp_path_factory.mktemp("local")
    jobs = catalogue_jobs(root, checkpoints, "eval: true\nbench: false\nctx: 64\ncard: true")
    result = invoke(jobs, "--out", root / "out", "--jobs", "2")
    return root, jobs, result


def test_failing_model_is_isolated_and_reported(local_run):
    root, jobs, result = local_run
    out = root / "out"
    assert result.exit_code == 2, result.output   # the failure is bad input (a NaN weight)
    error = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and error[0].startswith("error: tiny-nan: export: "), result.output
    assert "NaN/Inf" in error[0] and "model.layers.1.mlp.down_proj.weight" in error[0]
    assert not list((out / "tiny-nan").glob("*.gguf*"))
    summary = json.loads((out / "catalogue.json").read_text())
    status = {m["folder"]: m["status"] for m in summary["models"]}
    assert status == {"tiny-a": "ok", "tiny-nan": "failed", "tiny-b": "ok"}
    table = (out / "catalogue.md").read_text()
    assert "- tiny-nan: export:" in table
    rows = {(r["model"], r["type"]): r for m in summary["models"] for r in m["files"]}
    assert set(rows) == {("tiny-a", "F16"), ("tiny-a", "Q8_0"), ("tiny-a", "Q4_0"),
                         ("tiny-b", "Q8_0"), ("tiny-b", "Q4_K_M")}
    for (model, quant), row in rows.items():
        path = out / model / row["file"]
        assert row["bytes"] == path.stat().st_size
        assert row["ppl"] > 1 and f"| {model} | {quant} | " in table
    assert rows[("tiny-a", "F16")]["kld"] < rows[("tiny-a", "Q4_0")]["kld"]   # against the F16 of the ladder


def test_each_model_folder_matches_export(local_run, checkpoints, tmp_path):
    """A model's folder holds what `shortquant export` writes: the same GGUF bytes, results and card."""
    root, _, _ = local_run
    out = root / "out"
    for model, quants in (("tiny-a", ["f16", "q8_0", "q4_0"]), ("tiny-b", ["q8_0", "q4_k_m"])):
        ref = tmp_path / model
        args = ["export", str(checkpoints[model]), "--out", str(ref), "--quiet"]
        for q in quants:
            args += ["-q", q]
        assert CliRunner().invoke(main, args).exit_code == 0
        assert gguf_bytes(out / model) == gguf_bytes(ref)
        results = json.loads((out / model / "results.json").read_text())
        assert sorted(f["file"] for f in results["files"]) == sorted(gguf_bytes(ref))
        card = (out / model / "README.md").read_text()
        assert all(name in card for name in gguf_bytes(ref))
        assert len(list((out / model).glob("*.Modelfile"))) == len(quants)


def test_rerun_skips_finished_work_and_redoes_corrupt_files(local_run):
    root, jobs, _ = local_run
    out = root / "out"
    files = sorted((out / "tiny-a").glob("*.gguf")) + sorted((out / "tiny-b").glob("*.gguf"))
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in files}
    results_before = (out / "tiny-a" / "results.json").stat().st_mtime_ns

    report = run_batch(load_jobs(jobs), out, workers=1)
    by = {o.folder: o for o in report.outcomes}
    assert (by["tiny-a"].made, by["tiny-a"].kept) == ([], ["f16", "q8_0", "q4_0"])
    assert (by["tiny-b"].made, by["tiny-b"].kept) == ([], ["q8_0", "q4_k_m"])
    assert "evaluation up to date" in by["tiny-a"].steps and "card up to date" in by["tiny-a"].steps
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in files} == before
    assert (out / "tiny-a" / "results.json").stat().st_mtime_ns == results_before
    assert not by["tiny-nan"].ok                       # still failing, still reported

    # One file truncated, one changed in place: both redone, nothing else.
    q4, q8 = (next((out / "tiny-a").glob(f"*-{t}.gguf")) for t in ("Q4_0", "Q8_0"))
    good_q4, good_q8 = q4.read_bytes(), q8.read_bytes()
    q4.write_bytes(good_q4[: len(good_q4) // 2])
    with open(q8, "r+b") as f:
        f.seek(len(good_q8) - 100)
        f.write(b"\xff" * 8)
    report = run_batch(load_jobs(jobs), out, workers=1)
    by = {o.folder: o for o in report.outcomes}
    assert sorted(by["tiny-a"].made) == ["q4_0", "q8_0"] and by["tiny-a"].kept == ["f16"]
    assert by["tiny-b"].made == []
    assert q4.read_bytes() == good_q4 and q8.read_bytes() == good_q8
    # The redone files are byte for byte those measured before: the measurements still hold.
    assert "evaluation up to date" in by["tiny-a"].steps
    state = ModelState.load(out / "tiny-a")
    assert state.finished_file("q8_0", state.data["files"]["q8_0"]["fingerprint"]) is not None


def test_changed_settings_redo_the_files(tmp_path, checkpoints):
    jobs = write_jobs(tmp_path / "jobs.yaml", f"models:\n  - source: {checkpoints['tiny-a']}\n    quants: [q8_0]\n")
    out = tmp_path / "out"
    assert run_batch(load_jobs(jobs), out, workers=1).outcomes[0].made == ["q8_0"]
    write_jobs(jobs, f"models:\n  - source: {checkpoints['tiny-a']}\n    quants: [q8_0]\n    name: Renamed\n")
    outcome = run_batch(load_jobs(jobs), out, workers=1).outcomes[0]
    assert outcome.made == ["q8_0"] and outcome.kept == []
    assert next((out / "tiny-a").glob("Renamed-*-Q8_0.gguf"))


def test_publish_dry_run_stages_each_model_under_its_repo(tmp_path, demo):
    jobs = write_jobs(tmp_path / "jobs.yaml", f"""
quants: [q8_0]
recipe: shortquant-demo
card: true
repo: me/{{folder}}-GGUF
models:
  - source: {demo}
""")
    out = tmp_path / "out"
    result = invoke(jobs, "--out", out, "--publish", "--dry-run", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "demo.staging" / "manifest.json").read_text())
    assert manifest["repo"] == "me/demo-GGUF"
    uploaded = {f["path"] for f in manifest["files"]}
    assert "README.md" in uploaded and any(p.endswith("-Q8_0.gguf") for p in uploaded)
    assert STATE_FILE not in uploaded                      # the state file is never published


def test_publish_needs_repo_and_card(tmp_path, demo):
    jobs = write_jobs(tmp_path / "jobs.yaml", f"models:\n  - source: {demo}\n")
    result = invoke(jobs, "--out", tmp_path / "out", "--publish", "--dry-run")
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"error: {jobs}: models[0]: --publish needs 'repo' (e.g. repo: me/{{folder}}-GGUF)",
        f"error: {jobs}: models[0]: --publish needs 'card: true' (the hub page)"]


# -- interruption ----------------------------------------------------------------------------------

LADDER = "[f16, q8_0, q6_k, q5_k_m, q4_k_m, q3_k_m, q2_k]"


def _demo_catalogue(folder: Path, demo: Path) -> Path:
    return write_jobs(folder / "jobs.yaml", f"""
quants: {LADDER}
recipe: shortquant-demo
models:
  - source: {demo}
    folder: first
  - source: {demo}
    folder: second
  - source: {demo}
    folder: third
""")


def _batch_process(jobs: Path, out: Path, workers: int) -> subprocess.Popen:
    code = "import sys; from shortquant.cli import main; sys.argv[0] = 'shortquant'; main()"
    return subprocess.Popen([sys.executable, "-c", code, "batch", str(jobs), "--out", str(out), "--jobs",
                             str(workers), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)


def _kill_after_first_model(process: subprocess.Popen, out: Path, signum: int) -> None:
    deadline = time.monotonic() + 120
    while not (out / "first" / STATE_FILE).exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signum)
    process.wait(timeout=60)


@pytest.mark.parametrize("signum, workers", [(signal.SIGKILL, 1), (signal.SIGTERM, 2)])
def test_killed_run_resumes(tmp_path, demo, signum, workers):
    """SIGKILL of a run one model at a time; SIGTERM of a run with a pool (the workers clean up)."""
    jobs = _demo_catalogue(tmp_path, demo)
    out = tmp_path / "out"
    process = _batch_process(jobs, out, workers)
    _kill_after_first_model(process, out, signum)
    if signum == signal.SIGTERM:           # cleaned up like Ctrl-C: nothing half-written is left
        assert process.returncode != 0
        assert not list(out.rglob("*.part"))
    first = sorted((out / "first").glob("*.gguf"))
    assert len(first) == 7
    stamps = {p: p.stat().st_mtime_ns for p in first}

    report = run_batch(load_jobs(jobs), out, workers=1)
    by = {o.folder: o for o in report.outcomes}
    assert report.exit_code == 0 and by["first"].made == [] and len(by["first"].kept) == 7
    assert len(by["third"].made) == 7
    assert {p: p.stat().st_mtime_ns for p in first} == stamps
    assert not list(out.rglob("*.part"))
    # The resumed catalogue is the uninterrupted one, byte for byte.
    assert gguf_bytes(out / "first") == gguf_bytes(out / "second") == gguf_bytes(out / "third")
    reference = tmp_path / "reference"
    args = ["export", str(demo), "--out", str(reference), "--quiet", "--recipe", "shortquant-demo"]
    for q in LADDER.strip("[]").split(", "):
        args += ["-q", q]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert gguf_bytes(out / "third") == gguf_bytes(reference)


def test_ctrl_c_in_a_terminal_stops_the_pool_cleanly(tmp_path, demo):
    """Ctrl-C reaches the whole process group: the workers leave the stopping to the main process
    (one SIGTERM each), so each cleans up once, without a traceback, and no ``.part`` is left."""
    jobs = _demo_catalogue(tmp_path, demo)
    out = tmp_path / "out"
    code = "import sys; from shortquant.cli import main; sys.argv[0] = 'shortquant'; main()"
    process = subprocess.Popen([sys.executable, "-c", code, "batch", str(jobs), "--out", str(out), "--jobs", "2",
                                "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while len({p.parent for p in out.rglob("*.gguf.part")}) < 2:     # both workers busy exporting
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and "interrupted (SIGINT); no partial files were left behind" in stderr
    assert not list(out.rglob("*.part"))


def test_ray_mode_without_ray_installed_is_one_line(tmp_path, demo, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)       # as if Ray were not installed
    jobs = write_jobs(tmp_path / "jobs.yaml", f"models:\n  - source: {demo}\n")
    result = invoke(jobs, "--out", tmp_path / "out", "--ray", "auto")
    assert result.exit_code == 2
    assert result.output.strip() == "error: --ray needs Ray: pip install 'shortquant[ray]' (or pip install ray)"


# -- every export option -------------------------------------------------------------------------

# The flags whose name is not the jobs-file key with dashes (export's parameter names aside).
_FLAG = {"quants": "--quant", "tensor_types": "--tensor-type"}
# `export` flags that are not a model's settings: where and how the command prints.
_NOT_SETTINGS = {"source", "out_dir", "quiet", "as_json"}
# `export` parameters named differently from their jobs-file key.
_PARAM_KEY = {"license_id": "license", "evaluate": "eval", "text_path": "text", "make_card": "card"}


def test_every_export_option_is_a_jobs_file_setting():
    """A flag added to `export` is a jobs-file key too, and the jobs file takes nothing export lacks."""
    from shortquant.batch.jobsfile import DEFAULTS
    from shortquant.export import EXPORT_SETTINGS

    params = {_PARAM_KEY.get(p.name, p.name) for p in main.commands["export"].params} - _NOT_SETTINGS
    assert params == set(EXPORT_SETTINGS) | {"eval", "text", "ctx", "base", "split_max_size", "card"}
    assert set(EXPORT_SETTINGS) <= set(DEFAULTS)


def _cli_args(settings: dict) -> list[str]:
    """The `export` flags that say what ``settings`` (a jobs-file entry) says."""
    args = []
    for key, value in settings.items():
        flag = _FLAG.get(key, "--" + key.replace("_", "-"))
        if value is True:
            args.append(flag)
        else:
            args += [item for v in (value if isinstance(value, list) else [value]) for item in (flag, str(v))]
    return args


def _demo_imatrix(path: Path, demo: Path) -> Path:
    """An importance matrix covering every block weight of the demo model (random, positive)."""
    import numpy as np

    from shortquant.export import ExportOptions, make_model_plan
    from shortquant.quant.imatrix import Imatrix, write_imatrix
    from shortquant.source.checkpoint import open_checkpoint

    plan = make_model_plan(open_checkpoint(demo), ExportOptions())
    rng = np.random.default_rng(0)
    sums = {t.name: rng.uniform(0.1, 2.0, (1, t.shape[-1])).astype(np.float32)
            for t in plan.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    write_imatrix(path, Imatrix(sums, {n: np.array([64.0], np.float32) for n in sums}, datasets=["test"],
                                chunk_count=1, chunk_size=64))
    return path


def test_jobs_file_takes_every_export_option(tmp_path, demo, small_tokenizer):
    """Each export option in a jobs file writes the very bytes of the same `export` command."""
    import yaml

    from checkpoints import TinySpec, build_model, save_model
    from families import build_family_model, make_bpe_tokenizer
    from shortquant.evaluate.perplexity import DEFAULT_TEXT
    from shortquant.export import EXPORT_SETTINGS

    bpe = tmp_path / "bpe"
    build_family_model("qwen2", make_bpe_tokenizer(bpe, "qwen2"), layers=1).save_pretrained(bpe)
    tiny = save_model(build_model(TinySpec(hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           vocab_size=small_tokenizer[1], extra=dict(INIT))),
                      tmp_path / "tiny", tokenizer_model=small_tokenizer[0])
    calib = tmp_path / "calib.txt"
    calib.write_text(DEFAULT_TEXT.read_text(encoding="utf-8")[:2000])
    imatrix = _demo_imatrix(tmp_path / "demo.imatrix.gguf", demo)
    entries = {
        "a": (demo, {"quants": ["f32", "q4_k_m"], "recipe": "shortquant-demo", "source_blocks": "0-3,5,7",
                     "chat_template": "vicuna", "name": "Tidy", "pad_ffn": 0, "imatrix": str(imatrix),
                     "output_type": "q8_0", "embedding_type": "q6_k", "tensor_types": ["ffn_down=q5_k"],
                     "threads": 1, "allow_nonfinite": True, "base_model": "me/base-model",
                     "license": "apache-2.0", "force": True}),
        "b": (demo, {"quants": ["q4_0"], "pure": True, "remove_blocks": "2"}),
        "c": (bpe, {"quants": ["f32"], "pre": "qwen2"}),
        "d": (tiny, {"quants": ["q4_k_m"], "optimize": True, "target_bpw": 5.5, "target_size": "1.1M",
                     "calib": str(calib), "threads": 1, "probe_from": "memory", "optimize_keep": "output"}),
    }
    assert set(EXPORT_SETTINGS) == {key for _, settings in entries.values() for key in settings}
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(yaml.safe_dump({"models": [{"source": str(src), "folder": folder, **settings}
                                               for folder, (src, settings) in entries.items()]}))
    out = tmp_path / "out"
    result = invoke(jobs, "--out", out, "--jobs", 1, "--quiet")   # in this process: torch loads once
    assert result.exit_code == 0, result.output
    for folder, (src, settings) in entries.items():
        ref = tmp_path / "ref" / folder
        cli = CliRunner().invoke(main, ["export", str(src), "--out", str(ref), "--quiet", *_cli_args(settings)])
        assert cli.exit_code == 0, cli.output
        assert gguf_bytes(ref) and gguf_bytes(out / folder) == gguf_bytes(ref), folder
    assert any("_OPT" in name for name in gguf_bytes(out / "d"))   # the optimizer ran
    rerun = invoke(jobs, "--out", out, "--jobs", 1, "--quiet")   # all up to date, the optimized ladder too
    models = json.loads((out / "catalogue.json").read_text())["models"]
    assert rerun.exit_code == 0 and all(m["made"] == [] and m["kept"] for m in models), models


def test_jobs_file_export_option_problems(tmp_path, demo):
    jobs = write_jobs(tmp_path / "jobs.yaml", f"""
models:
  - source: {demo}
    pad_ffn: -1
    target_bpw: 99
    target_size: 1.5X
    calib: missing.txt
    licence: mit
  - source: {demo}
    folder: two
    optimize: true
""")
    with pytest.raises(JobsFileError) as info:
        load_jobs(jobs)
    text = "\n".join(info.value.problems)
    for expected in ("models[0].pad_ffn: expected a whole number >= 0", "models[0].target_bpw:",
                     "models[0].target_size: invalid size '1.5X'", "models[0].calib: no such file",
                     "models[0].licence: unknown setting (did you mean 'license'?)",
                     "models[1].calib: --optimize, --target-bpw and --target-size need a calibration text"):
        assert expected in text, (expected, text)
