#!/usr/bin/env python3
"""Benchmark ``shortquant batch``: scheduling overhead of each mode, and the unit of work.

The catalogue is the embedded demo model plus two tiny transformers checkpoints, three types
each (q8_0, q4_k_m, q2_k), no evaluation. Each configuration runs ``shortquant batch`` as a
child process into a fresh output folder, ``--reps`` times; the median wall time is reported:

  sequential    --jobs 1: one model after another in the driver process
  pool          local mode, a process pool sized to the machine (the default)
  ray           --ray local: starts a private Ray instance (its start-up included)
  ray-warm      the same catalogue on a Ray instance started once before (start-up excluded)
  pool/type     the pool, with one job per (model, type) instead of per model's ladder
  ray-warm/type the warm Ray instance, one task per (model, type)
  ray-Nnode(s)x1cpu   a simulated cluster (ray.cluster_utils) of 1 and 2 one-CPU nodes, started
                before the clock: how the time changes with the number of nodes

and the bare work: the three ladders exported by the library in one process, no batch at all.
Every configuration's GGUF files are checked to be byte for byte those of `sequential`.

    python scripts/bench_batch.py --out-dir /tmp/bench-batch             # ~3 min on 2 cores
    python scripts/bench_batch.py --out-dir /tmp/bench-batch --no-ray    # without Ray
    python scripts/bench_batch.py --out-dir /tmp/bench-batch --unit-only # ladder vs type, ~100 M model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

QUANTS = ["q8_0", "q4_k_m", "q2_k"]
CLI = "import sys; from shortquant.cli import main; sys.argv[0] = 'shortquant'; main()"


def build_sources(root: Path) -> dict[str, tuple[Path, str | None]]:
    """folder name -> (checkpoint, recipe): the demo model and two tiny checkpoints."""
    from checkpoints import TinySpec, build_model, save_model
    from shortquant.export import resolve_source

    demo, recipe = resolve_source(None)
    tokenizer = demo / "tokenizer.model"
    sources = {"demo": (demo, recipe)}
    for name, layers, seed in (("tiny-a", 3, 1), ("tiny-b", 4, 2)):
        folder = root / "sources" / name
        if not (folder / "config.json").is_file():
            model = build_model(TinySpec(num_hidden_layers=layers, vocab_size=512, seed=seed,
                                         extra={"initializer_range": 0.05}))
            save_model(model, folder, tokenizer_model=tokenizer)
        sources[name] = (folder, None)
    return sources


def write_jobs(path: Path, sources, per_type: bool) -> Path:
    lines = ["models:"]
    for name, (folder, recipe) in sources.items():
        for quants, suffix in ([([q], f"-{q}") for q in QUANTS] if per_type else [(QUANTS, "")]):
            lines += [f"  - source: {folder}", f"    folder: {name}{suffix}", f"    quants: [{', '.join(quants)}]"]
            if recipe:
                lines.append(f"    recipe: {recipe}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_batch_cli(jobs: Path, out: Path, extra: list[str], env=None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CLI, "batch", str(jobs), "--out", str(out), "--quiet", *extra],
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"batch {extra} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def gguf_bytes(out: Path) -> dict[str, bytes]:
    """GGUF contents by file name (per-type runs use other folder names, the same file names)."""
    return {p.name + "@" + p.parent.name.split("-q")[0]: p.read_bytes() for p in sorted(out.rglob("*.gguf"))}


def bare_work(sources, out: Path) -> float:
    """The ladders exported by the library in this process, one after another: the floor."""
    from shortquant.export import ExportOptions, export
    from shortquant.recipes import load_recipe

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    for name, (folder, recipe) in sources.items():
        export(folder, ExportOptions(quants=tuple(QUANTS), out_dir=out / name, quiet=True,
                                     recipe=load_recipe(recipe) if recipe else None))
    return time.perf_counter() - start


def cluster_times(jobs: Path, out: Path, nodes: int, reps: int) -> list[float]:
    """A simulated cluster on this machine (ray.cluster_utils): ``nodes`` nodes of one CPU each,
    started before the clock; how the same catalogue's time changes with the number of nodes."""
    import ray
    from ray.cluster_utils import Cluster

    from shortquant.batch import load_jobs, run_batch

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    times = []
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        for _ in range(reps):
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            report = run_batch(load_jobs(jobs), out, ray="auto")
            times.append(time.perf_counter() - start)
            assert report.exit_code == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    return times


class WarmRay:
    """A Ray head started once (`ray start`), so a batch measures scheduling, not start-up."""

    def __init__(self, cpus: int):
        self.env = dict(os.environ)
        subprocess.run(["ray", "start", "--head", f"--num-cpus={cpus}", "--include-dashboard=false",
                        "--disable-usage-stats"], check=True, capture_output=True, env=self.env)

    def stop(self):
        subprocess.run(["ray", "stop", "--force"], capture_output=True, env=self.env)


def unit_of_work(root: Path, reps: int) -> dict[str, float]:
    """Ladder per task against type per task on a larger checkpoint (~100 M parameters, f32), where
    reading and transforming the source is not negligible: one export of the three types against
    three exports of one type each (the work a type-per-task scheduler does), in this process."""
    from checkpoints import TinySpec, build_model, save_model
    from shortquant.export import ExportOptions, export, resolve_source

    folder = root / "sources" / "unit-100m"
    if not (folder / "config.json").is_file():
        spec = TinySpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                        num_key_value_heads=16, vocab_size=512, seed=4)
        save_model(build_model(spec), folder, tokenizer_model=resolve_source(None)[0] / "tokenizer.model")
    out = root / "out-unit"
    result = {"ladder": [], "per_type": []}
    for _ in range(reps):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        export(folder, ExportOptions(quants=tuple(QUANTS), out_dir=out / "ladder", quiet=True))
        result["ladder"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for q in QUANTS:
            export(folder, ExportOptions(quants=(q,), out_dir=out / "per-type", quiet=True))
        result["per_type"].append(time.perf_counter() - start)
        ladder, per_type = ({p.name: p.read_bytes() for p in (out / d).glob("*.gguf")} for d in ("ladder", "per-type"))
        assert ladder == per_type and len(ladder) == len(QUANTS)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--unit-only", action="store_true",
                        help="Only the ladder-per-task against type-per-task export on a ~100 M checkpoint.")
    args = parser.parse_args()
    root = args.out_dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.unit_only:
        unit = unit_of_work(root, args.reps)
        (root / "bench_unit.json").write_text(json.dumps(unit, indent=2) + "\n")
        for name, t in unit.items():
            print(f"{name:<10} median {statistics.median(t):6.2f} s  runs {[round(x, 2) for x in t]}")
        return
    sources = build_sources(root)
    ladder_jobs = write_jobs(root / "ladder.yaml", sources, per_type=False)
    type_jobs = write_jobs(root / "per-type.yaml", sources, per_type=True)
    cores = os.cpu_count() or 1

    configs = [("sequential", ladder_jobs, ["--jobs", "1"]), ("pool", ladder_jobs, []),
               ("pool/type", type_jobs, [])]
    times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    times["bare"] = []
    reference = None
    ray = None
    if not args.no_ray:
        configs += [("ray", ladder_jobs, ["--ray", "local"])]
        times["ray"] = []
    try:
        for rep in range(args.reps):
            times["bare"].append(bare_work(sources, root / "out-bare"))
            print(f"rep {rep}: bare {times['bare'][-1]:.2f} s", flush=True)
            for name, jobs, extra in configs:
                out = root / f"out-{name.replace('/', '-')}"
                times[name].append(run_batch_cli(jobs, out, extra))
                print(f"rep {rep}: {name} {times[name][-1]:.2f} s", flush=True)
                got = gguf_bytes(out)
                reference = reference or got
                assert got == reference, f"{name}: files differ from the first configuration"
        if not args.no_ray:
            ray = WarmRay(cores)
            for name, jobs in (("ray-warm", ladder_jobs), ("ray-warm/type", type_jobs)):
                times[name] = []
                for rep in range(args.reps):
                    out = root / f"out-{name.replace('/', '-')}"
                    times[name].append(run_batch_cli(jobs, out, ["--ray", "auto"], env=ray.env))
                    print(f"rep {rep}: {name} {times[name][-1]:.2f} s", flush=True)
                    assert gguf_bytes(out) == reference, f"{name}: files differ"
    finally:
        if ray:
            ray.stop()
    if not args.no_ray:
        for nodes in (1, 2):
            name = f"ray-{nodes}node{'s' if nodes > 1 else ''}x1cpu"
            times[name] = cluster_times(ladder_jobs, root / f"out-{name}", nodes, args.reps)
            print(f"{name}: {times[name]}", flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    summary = {name: {"median_s": round(statistics.median(t), 2), "runs_s": [round(x, 2) for x in t]}
               for name, t in times.items()}
    result = {"cores": cores, "load_average_1min": load, "models": list(sources), "quants": QUANTS,
              "reps": args.reps, "times": summary}
    (root / "bench_batch.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(sources)} models x {len(QUANTS)} types, {cores} cores, load average {load:.1f}")
    print(f"{'configuration':<15} {'median s':>9}  runs")
    for name, t in summary.items():
        print(f"{name:<15} {t['median_s']:9.2f}  {t['runs_s']}")


if __name__ == "__main__":
    main()
