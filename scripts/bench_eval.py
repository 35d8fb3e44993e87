#!/usr/bin/env python3
"""Benchmark ``shortquant eval``, ``imatrix`` and ``bench`` against llama.cpp's own tools.

Builds (once, cached in --out-dir) a checkpoint of seeded random bf16 weights with a small
model's shapes and a large vocabulary (default: SmolLM-135M's: hidden 576, FFN 1536, 9 heads /
3 KV heads, 49,152-token vocabulary, tied embeddings, 30 blocks) plus the real LLaMA
tokenizer from the shared fixtures (the vocabulary is padded to 49,152 with unused tokens, so
every logit row is 49,152 wide), exports it to F16 and Q8_0 with ``shortquant export``, and
then times, in paired runs (ours and llama.cpp's alternately, each a child process measured
by GNU time: wall, user+system CPU, peak RSS):

  ppl      shortquant eval F16               vs  llama-perplexity -m F16
  kld      shortquant eval Q8_0 --base F16   vs  llama-perplexity -m Q8_0 --kl-divergence
           (the base pass already done and cached on both sides)
  kld+base the same, base computed in the run  vs  llama-perplexity on F16 with
           --kl-divergence-base, then on Q8_0 with --kl-divergence (times added)
  imatrix  shortquant imatrix HF-folder (torch)  vs  llama-imatrix -m F16
  imatrix-gguf  shortquant imatrix F16.gguf (llama.cpp's evaluation)  vs  llama-imatrix -m F16
  bench    shortquant bench F16 (pp512, tg128)  vs  llama-bench -m F16 -p 512 -n 128

The ratios are medians over the pairs (ours / llama.cpp). Results go to
<out-dir>/bench_eval.json and a table to stdout.

    python scripts/bench_eval.py --out-dir /tmp/bench-eval                 # everything
    python scripts/bench_eval.py --out-dir /tmp/bench-eval --only ppl kld --reps 3
    python scripts/bench_eval.py --blocks 8 --chunks 24                     # quicker
    python scripts/bench_eval.py --shape llama3-8b --only ppl kld+base --chunks 4   # 128k vocabulary

llama.cpp's tools are built the first time by scripts/llama_cpp_tools.py (cached).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_export import SHAPES, Step, build_checkpoint, measure  # noqa: E402

SHARED = Path(os.environ.get("SHORTQUANT_SHARED", REPO.parent / "shared")) / "fixtures"
TOKENIZER_FIXTURE = SHARED / "llama-tokenizer.model"
TEXT_FIXTURE = SHARED / "calibration-text.txt"
TARGETS = {  # step -> (wall ratio at most, peak RSS ratio at most), from issue 13
    "ppl": (1.05, 1.2),
    "kld": (1.05, 1.2),
    "kld+base": (1.05, 1.2),
    "imatrix": (1.5, None),
    "imatrix-gguf": (1.5, None),
}
TOOLS = ("llama-perplexity", "llama-imatrix", "llama-bench")


# ---------------------------------------------------------------------------------------------
# The model (bench_export.py builds the checkpoint)
# ---------------------------------------------------------------------------------------------

def export_ggufs(src: Path, out: Path) -> dict[str, Path]:
    """F16 and Q8_0 exports of ``src`` (reused when present)."""
    files = {q: sorted(out.glob(f"*-{q.upper()}.gguf")) for q in ("f16", "q8_0")}
    if not all(files.values()):
        print(f"exporting F16 and Q8_0 to {out} ...", flush=True)
        subprocess.run([*SHORTQUANT, "export", str(src), "--quant", "f16", "--quant", "q8_0",
                        "--out", str(out), "--quiet"], check=True, env=ENV)
        files = {q: sorted(out.glob(f"*-{q.upper()}.gguf")) for q in ("f16", "q8_0")}
    return {q: paths[0] for q, paths in files.items()}


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

# shortquant.cli has no __main__; call its click group the way the console script does.
SHORTQUANT = [sys.executable, "-c", "import sys; from shortquant.cli import main; sys.argv[0] = 'shortquant'; main()"]
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
KLD_MEAN = re.compile(r"Mean\s+KLD:\s+(-?[0-9.]+) ±\s+([0-9.]+)")


def last_output(log: Path) -> str:
    text = log.read_text(errors="replace")
    return text[text.rfind("\n### "):]


def run_pair(name: str, ours: list, theirs: list, log: Path, reps: int, before=None, after=None):
    """``reps`` alternating runs of both commands; returns (our steps, their steps, outputs)."""
    mine, others, outputs = [], [], {"ours": [], "theirs": []}
    for rep in range(reps):
        order = [("ours", ours), ("theirs", theirs)] if rep % 2 == 0 else [("theirs", theirs), ("ours", ours)]
        for side, cmd in order:
            if before:
                before(side)
            if callable(cmd):
                step = cmd(f"{name} {side} #{rep + 1}")
            else:
                step = measure(f"{name} {side} #{rep + 1}", cmd, log, env=ENV)
            (mine if side == "ours" else others).append(step)
            outputs[side].append(last_output(log))
            if after:
                after(side)
    return mine, others, outputs


def summarize(name: str, mine: list[Step], others: list[Step]) -> dict:
    def med(steps, attr):
        return statistics.median(getattr(s, attr) for s in steps)

    pairs = [a.wall_s / b.wall_s for a, b in zip(mine, others)]
    out = {
        "ours": {"wall_s": med(mine, "wall_s"), "cpu_s": med(mine, "cpu_s"), "peak_rss_mb": med(mine, "peak_rss_mb")},
        "llama_cpp": {"wall_s": med(others, "wall_s"), "cpu_s": med(others, "cpu_s"),
                      "peak_rss_mb": med(others, "peak_rss_mb")},
        "pair_wall_ratios": [round(r, 3) for r in pairs],
        "runs": {"ours": [asdict(s) for s in mine], "llama_cpp": [asdict(s) for s in others]},
    }
    out["wall_ratio"] = out["ours"]["wall_s"] / out["llama_cpp"]["wall_s"]
    out["cpu_ratio"] = out["ours"]["cpu_s"] / out["llama_cpp"]["cpu_s"]
    out["rss_ratio"] = out["ours"]["peak_rss_mb"] / out["llama_cpp"]["peak_rss_mb"]
    wall_target, rss_target = TARGETS.get(name, (None, None))
    out["targets"] = {"wall_ratio_at_most": wall_target, "rss_ratio_at_most": rss_target}
    return out


def parse_json(output: str) -> dict:
    start = output.find("{")
    return json.loads(output[start:output.rfind("}") + 1]) if start >= 0 else {}


def importance_agreement(ours: Path, ref: Path) -> dict:
    """How far our imatrix's per-column importance is from llama-imatrix's (relative)."""
    import numpy as np

    from shortquant.quant.imatrix import read_imatrix

    a, b = read_imatrix(ours).importance(), read_imatrix(ref).importance()
    common = sorted(a.keys() & b.keys())
    rel = np.concatenate([np.abs(a[n] - b[n]) / np.maximum(np.abs(b[n]), 1e-30) for n in common])
    return {"entries_ours": len(a), "entries_llama_cpp": len(b), "common": len(common),
            "median_rel_diff": float(np.median(rel)), "p99_rel_diff": float(np.percentile(rel, 99)),
            "max_rel_diff": float(rel.max())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/shortquant-bench-eval"))
    parser.add_argument("--shape", choices=("smol", "llama3-8b"), default="smol",
                        help="smol: SmolLM-135M's shapes; llama3-8b: Llama-3-8B's (128,256-token BPE "
                             "vocabulary, built by bench_export.py; its logits are what strains memory)")
    parser.add_argument("--blocks", type=int, default=None, help="[30 for smol, 2 for llama3-8b]")
    parser.add_argument("--text", type=Path, default=TEXT_FIXTURE)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=24, help="perplexity / KLD chunks")
    parser.add_argument("--imatrix-chunks", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2, help="pairs of runs per step")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--only", nargs="*", default=["ppl", "kld", "kld+base", "imatrix", "imatrix-gguf", "bench"])
    parser.add_argument("--code", type=Path, default=REPO,
                        help="the shortquant source tree to time (e.g. an older commit unpacked with "
                             "git archive, for before/after tables); default: this one")
    args = parser.parse_args()
    ENV["PYTHONPATH"] = str(args.code.resolve()) + os.pathsep + os.environ.get("PYTHONPATH", "")

    if not TOKENIZER_FIXTURE.is_file() or not args.text.is_file():
        print(f"skipping: needs {TOKENIZER_FIXTURE} and {args.text}")
        return 0
    from llama_cpp_tools import ensure_tools

    needed = {"llama-perplexity": {"ppl", "kld", "kld+base"}, "llama-imatrix": {"imatrix", "imatrix-gguf"},
              "llama-bench": {"bench"}}
    tools = ensure_tools(tuple(t for t in TOOLS if needed[t] & set(args.only))).binaries
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.code.resolve() == REPO else f"-{args.code.resolve().name}"
    log = out / f"bench_eval{tag}.log"
    with open(log, "a") as fh:
        fh.write(f"\n=== {' '.join(sys.argv)}\n")
    args.blocks = args.blocks or (2 if args.shape == "llama3-8b" else 30)
    shape = SHAPES[args.shape]
    src = build_checkpoint(out / f"{args.shape}-{args.blocks}blk", args.blocks, shape_name=args.shape)
    if src is None:   # no tokenizer fixture
        return 0
    gguf = export_ggufs(src, out / f"gguf-{args.shape}-{args.blocks}blk" if args.shape != "smol"
                        else out / f"gguf-{args.blocks}blk")
    for path in [*gguf.values(), *src.iterdir()]:  # warm the page cache for both sides alike
        with open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    t, c, text = str(args.threads), str(args.ctx), str(args.text)
    print(f"model: {gguf['f16'].name} ({args.blocks} blocks, vocab {shape['vocab_size']}), ctx {c}, "
          f"threads {t}, load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict = {"model": {"checkpoint": str(src), **{k: str(v) for k, v in gguf.items()},
                               "blocks": args.blocks, **shape},
                     "settings": vars(args) | {"out_dir": str(out), "text": text, "only": args.only},
                     "load_average_start": os.getloadavg(), "steps": {}}
    steps = results["steps"]
    ours_eval = [*SHORTQUANT, "eval", "--text", text, "--ctx", c, "--chunks", str(args.chunks),
                 "--threads", t, "--quiet", "--json"]
    llama_ppl = [tools.get("llama-perplexity"), "-f", text, "-c", c, "--chunks", str(args.chunks), "-t", t]

    if "ppl" in args.only:
        mine, theirs, outputs = run_pair("ppl", [*ours_eval, gguf["f16"]], [*llama_ppl, "-m", gguf["f16"]],
                                         log, args.reps)
        steps["ppl"] = summarize("ppl", mine, theirs)
        ours_ppl = parse_json(outputs["ours"][0])["files"][0]["ppl"]
        ref_ppl = float(FINAL.search(outputs["theirs"][0]).group(1))
        steps["ppl"]["values"] = {"ours": ours_ppl, "llama_cpp": ref_ppl,
                                  "same_to_4_decimals": f"{ours_ppl:.4f}" == f"{ref_ppl:.4f}"}

    base_logits = out / "f16.kld-base"
    cache = out / "base-cache"
    if "kld" in args.only or "kld+base" in args.only:
        def their_base(name):
            return measure(name, [*llama_ppl, "-m", gguf["f16"], "--kl-divergence-base", base_logits], log)

        def their_kld(name):
            return measure(name, [*llama_ppl, "-m", gguf["q8_0"], "--kl-divergence-base", base_logits,
                                  "--kl-divergence"], log)

        ours_kld = [*ours_eval, gguf["q8_0"], "--base", gguf["f16"], "--cache-dir", cache]
    if "kld+base" in args.only:
        def their_both(name):
            first = their_base(name + " (base)")
            second = their_kld(name + " (kld)")
            return Step(name, first.wall_s + second.wall_s, first.cpu_s + second.cpu_s,
                        max(first.peak_rss_mb, second.peak_rss_mb), [first.name, second.name])

        def clear(side):
            shutil.rmtree(cache, ignore_errors=True)
            base_logits.unlink(missing_ok=True)

        mine, theirs, _ = run_pair("kld+base", ours_kld, their_both, log, args.reps, before=clear)
        steps["kld+base"] = summarize("kld+base", mine, theirs)
    if "kld" in args.only:
        if not base_logits.is_file():
            their_base("kld base pass (untimed)")
        subprocess.run(ours_kld, check=True, env=ENV, capture_output=True)  # our base cache
        mine, theirs, outputs = run_pair("kld", ours_kld, their_kld, log, args.reps)
        steps["kld"] = summarize("kld", mine, theirs)
        ours_k = parse_json(outputs["ours"][0])["files"][0]["kld"]
        ref = KLD_MEAN.search(outputs["theirs"][0])
        steps["kld"]["values"] = {"ours_mean": ours_k["mean"], "ours_err": ours_k["err"],
                                  "llama_cpp_mean": float(ref.group(1)), "llama_cpp_err": float(ref.group(2)),
                                  "ours_ppl": parse_json(outputs["ours"][0])["files"][0]["ppl"]}

    llama_imatrix = [tools.get("llama-imatrix"), "-m", gguf["f16"], "-f", text, "-c", c,
                     "--chunks", str(args.imatrix_chunks), "-t", t, "-o", out / "llama.imatrix.gguf"]
    ours_imatrix = [*SHORTQUANT, "imatrix", "--text", text, "--ctx", c, "--chunks", str(args.imatrix_chunks),
                    "--threads", t, "--quiet"]
    for name, model in (("imatrix", src), ("imatrix-gguf", gguf["f16"])):
        if name in args.only:
            mine_out = out / f"{name}.imatrix.gguf"
            mine, theirs, _ = run_pair(name, [*ours_imatrix, model, "-o", mine_out], llama_imatrix, log, args.reps)
            steps[name] = summarize(name, mine, theirs)
            steps[name]["agreement"] = importance_agreement(mine_out, out / "llama.imatrix.gguf")

    if "bench" in args.only:
        ours_bench = [*SHORTQUANT, "bench", gguf["f16"], "--threads", t, "--reps", "5", "--json", "--quiet"]
        llama_bench = [tools.get("llama-bench"), "-m", gguf["f16"], "-p", "512", "-n", "128", "-t", t, "-r", "5",
                       "-o", "json"]
        mine, theirs, outputs = run_pair("bench", ours_bench, llama_bench, log, args.reps)
        speeds = {"ours": [], "llama_cpp": []}
        for text_out in outputs["ours"]:
            speed = parse_json(text_out)["files"][0]["speed"]
            speeds["ours"].append({k: speed[k] for k in ("pp512", "tg128")})
        for text_out in outputs["theirs"]:
            rows = json.loads(text_out[text_out.find("["):text_out.rfind("]") + 1])
            entry = {}
            for row in rows:
                key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
                entry[key] = {"mean": row["avg_ts"], "std": row["stddev_ts"]}
            speeds["llama_cpp"].append(entry)
        steps["bench"] = {"speeds": speeds}

    results["load_average_end"] = os.getloadavg()
    tag += "" if args.shape == "smol" else f"-{args.shape}"
    name = f"bench_eval{tag}.json" if len(args.only) == 6 else f"bench_eval{tag}-{'_'.join(args.only)}.json"
    (out / name).write_text(json.dumps(results, indent=2, default=str))
    print()
    print(table(steps))
    print(f"\nwritten: {out / name} (log: {log})")
    return 0


def table(steps: dict) -> str:
    lines = [f"{'step':<13} {'ours s':>7} {'llama s':>8} {'wall x':>7} {'CPU x':>6} {'ours MB':>8} "
             f"{'llama MB':>9} {'RSS x':>6}  pairs (wall x)   targets (wall, RSS)"]
    for name, s in steps.items():
        if name == "bench":
            continue
        tw, tr = s["targets"]["wall_ratio_at_most"], s["targets"]["rss_ratio_at_most"]
        lines.append(f"{name:<13} {s['ours']['wall_s']:7.1f} {s['llama_cpp']['wall_s']:8.1f} "
                     f"{s['wall_ratio']:7.3f} {s['cpu_ratio']:6.3f} {s['ours']['peak_rss_mb']:8.0f} "
                     f"{s['llama_cpp']['peak_rss_mb']:9.0f} {s['rss_ratio']:6.3f}  "
                     f"{' '.join(f'{r:.3f}' for r in s['pair_wall_ratios']):<16} <= {tw}, <= {tr}")
    for name in ("ppl", "kld"):
        if name in steps and "values" in steps[name]:
            lines.append(f"{name} values: {json.dumps(steps[name]['values'])}")
    for name in ("imatrix", "imatrix-gguf"):
        if name in steps:
            lines.append(f"{name} vs llama-imatrix: {json.dumps(steps[name]['agreement'])}")
    if "bench" in steps:
        for side, runs in steps["bench"]["speeds"].items():
            for run in runs:
                lines.append(f"bench {side:<9} " + "  ".join(
                    f"{k} {v['mean']:8.1f} ± {v['std']:5.1f} t/s" for k, v in sorted(run.items())))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
