#!/usr/bin/env python3
"""Issue 23's cost and memory targets: ``export -q q4_k_m --optimize`` against a plain
``export -q q4_k_m`` of the same LLaMA-7B-shaped checkpoint (random bf16 weights), each a child
process under GNU time: wall, CPU (user + system), peak RSS; their ratios; the peak against the
checkpoint's bytes; and the optimizer's seconds and peak RSS per stage (from ``export --json``).

The checkpoint is ``bench_export.py``'s builder at 2 blocks, deepened to --blocks by repeating
those two blocks' bytes (``bench_prune_cost.deepen``; the cost does not depend on the values).
No imatrix on either side (the same inputs; an imatrix changes the candidate types, not the work).

    nice python scripts/bench_optimize_cost.py --blocks 8 --calib calib20k.txt
    nice python scripts/bench_optimize_cost.py --blocks 32 --calib calib20k.txt --out-dir /tmp/b32
    nice python scripts/bench_optimize_cost.py --blocks 8 --calib calib20k.txt -- --probe-from memory
    nice python scripts/bench_optimize_cost.py --blocks 8 --calib calib20k.txt -- -q q3_k_m   # a ladder of two
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_export import build_checkpoint, measure  # noqa: E402
from bench_prune_cost import deepen  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/shortquant-bench"))
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-export", action="store_true", help="time the optimized export only")
    parser.add_argument("export_args", nargs="*", help="extra options for the optimized export (after --)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    two = build_checkpoint(args.out_dir / "llama-7b-2", 2)
    src = two if args.blocks == 2 else deepen(two, args.out_dir / f"llama-7b-{args.blocks}", args.blocks)
    checkpoint_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    log = args.out_dir / "bench_optimize_cost.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = [sys.executable, "-c", "import sys; from shortquant.cli import main; sys.argv[0] = 'shortquant'; main()"]
    results = {}
    if not args.skip_export:
        out = args.out_dir / "o_plain"
        results["export"] = measure("export -q q4_k_m", [*cli, "export", src, "-q", "q4_k_m", "--out", out,
                                                          "--quiet", "-t", args.threads, "--force"], log, env)
        shutil.rmtree(out, ignore_errors=True)
    with open(log, "ab") as f:
        f.write(b"\n### the optimized export's --json follows\n")
    out = args.out_dir / "o_opt"
    results["optimize"] = measure("export -q q4_k_m --optimize", [
        *cli, "export", src, "-q", "q4_k_m", "--optimize", "--calib", args.calib, "--out", out, "--quiet",
        "-t", args.threads, "--force", "--json", *args.export_args], log, env)
    shutil.rmtree(out, ignore_errors=True)
    text = log.read_text(errors="replace")
    doc = json.loads(text[text.rindex("\n{\n") + 1:])
    (args.out_dir / "optimize.json").write_text(json.dumps(doc, indent=2))
    outcome = doc["optimized"][0]   # a ladder's targets share one run's stages and peaks
    o = results["optimize"]
    print(f"\n{args.blocks} blocks, checkpoint {checkpoint_bytes / 2**30:.2f} GiB; probe from {outcome['probe_from']}")
    for each in doc["optimized"]:
        print(f"  {each['target']}: optimized {each['optimized']}, {each['bytes']:,} of {each['budget']:,} bytes")
    print("  stages (wall s): " + ", ".join(f"{k} {v:.1f}" for k, v in outcome["seconds"].items()))
    print("  peak RSS at each stage's end (MB): " + ", ".join(f"{k} {v}" for k, v in outcome["peak_rss_mb"].items()))
    print(f"peak RSS {o.peak_rss_mb / 1024:.2f} GiB = {o.peak_rss_mb * 2**20 / checkpoint_bytes:.2f}x the checkpoint")
    if "export" in results:
        e = results["export"]
        print(f"ratio optimize/export: wall {o.wall_s / e.wall_s:.2f}x, CPU {o.cpu_s / e.cpu_s:.2f}x "
              f"(export {e.cpu_s:.0f} s CPU, {e.peak_rss_mb / 1024:.2f} GiB peak)")


if __name__ == "__main__":
    main()
