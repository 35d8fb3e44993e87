#!/usr/bin/env python3
"""Issue 22's cost target: ``prune --remove K`` against a plain ``export -q q4_k_m`` of the same
LLaMA-7B-shaped checkpoint (random bf16 weights), each a child process under GNU time: wall,
CPU (user + system), peak RSS, their ratio, and prune's time per stage (from ``prune --json``'s
``cost.sweeps``: reference pass, one-shot PPL sweep, Taylor, greedy steps and held-apart checks).

The checkpoint is ``bench_export.py``'s builder at 2 blocks, deepened to --blocks by repeating
those two blocks' bytes (writing 32 blocks of fresh random numbers takes longer than the
benchmark; the cost does not depend on the values).

    nice python scripts/bench_prune_cost.py --blocks 8 --remove 2 --calib calib20k.txt
    nice python scripts/bench_prune_cost.py --blocks 32 --remove 8 --calib calib20k.txt --skip-export
    nice python scripts/bench_prune_cost.py --blocks 8 --remove 2 --calib calib20k.txt -- --criterion ppl
    nice python scripts/bench_prune_cost.py --blocks 32 --calib calib20k.txt --sweep-only   # memory at depth
    nice python scripts/bench_prune_cost.py --source /tmp/b32/llama-7b-32 --out-dir /tmp/pc --calib calib20k.txt

``--sweep-only``: no search, only the streamed model, its reference pass and one sweep of four
one-block-removed sets on 2 chunks of --ctx tokens: peak RSS and the seconds a block read takes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_export import build_checkpoint, measure  # noqa: E402


def deepen(src: Path, dst: Path, blocks: int) -> Path:
    """``src`` (a 2-block checkpoint) with ``blocks`` blocks: block i holds src's block i % 2."""
    stamp = {**json.loads((src / "bench_stamp.json").read_text()), "blocks": blocks, "deepened_from": 2}
    if (dst / "bench_stamp.json").is_file() and json.loads((dst / "bench_stamp.json").read_text()) == stamp:
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    with open(src / "model.safetensors", "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        base = 8 + size
        header.pop("__metadata__", None)
        entries, copies, offset = {}, [], 0

        def add(name, info):
            nonlocal offset
            start, stop = info["data_offsets"]
            entries[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + stop - start]}
            copies.append((base + start, stop - start))
            offset += stop - start

        for name, info in header.items():
            if not name.startswith("model.layers."):
                add(name, info)
        for i in range(blocks):
            for name, info in header.items():
                if name.startswith(f"model.layers.{i % 2}."):
                    add(f"model.layers.{i}." + name[len(f"model.layers.{i % 2}."):], info)
        text = json.dumps(entries).encode()
        text += b" " * (-len(text) % 8)
        with open(dst / "model.safetensors.part", "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            for start, length in copies:
                f.seek(start)
                out.write(f.read(length))
    for p in src.iterdir():
        if p.name not in ("model.safetensors", "bench_stamp.json"):
            shutil.copy(p, dst / p.name)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "num_hidden_layers": blocks}, indent=2))
    (dst / "model.safetensors.part").rename(dst / "model.safetensors")
    (dst / "bench_stamp.json").write_text(json.dumps(stamp))
    return dst


SWEEP_CODE = r"""
import json, sys, time
import torch
from shortquant.families.hf_model import load_torch_model
from shortquant.families.block_runner import BlockRunner
from shortquant.quant.imatrix import chunk_tokens
from shortquant.system import peak_rss
from shortquant.tokenizer.encode import encode_text

src, calib, ctx, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
ids, bos = encode_text(src, open(calib, encoding="utf-8").read())
start = time.perf_counter()
model = load_torch_model(src, stream_blocks=True)
built, rss_built = time.perf_counter() - start, peak_rss()
runner = BlockRunner(model, chunk_tokens(ids, ctx=ctx, chunks=2, bos_id=bos), held_apart=1)
n = runner.n_blocks
runner.ppl_many([{0}, {n // 3}, {2 * n // 3}, {n - 1}], runner.search)
print(json.dumps({"build_s": round(built, 1), "peak_rss_after_build_mb": rss_built >> 20,
                  "peak_rss_mb": peak_rss() >> 20, "sweeps": runner.costs}))
"""


def stages(sweeps: list[dict]) -> dict[str, list[float]]:
    """[wall s, CPU s, block-token runs, sweeps] per stage from prune's sweep log (each entry is
    "STAGE: sweep on SPLITS"; greedy steps and exchange rounds summed)."""
    out: dict[str, list[float]] = {}
    for s in sweeps:
        what = s["what"].split(":")[0]
        what = "greedy steps" if what.startswith("greedy step") else "exchanges" if what.startswith("exchanges") \
            else what
        row = out.setdefault(what, [0.0, 0.0, 0, 0])
        row[0] += s["seconds"]
        row[1] += s["cpu_s"]
        row[2] += s["block_token_runs"]
        row[3] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/shortquant-bench"))
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--source", type=Path, help="an existing checkpoint to time (instead of building one)")
    parser.add_argument("--remove", type=int, default=8)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-export", action="store_true", help="time prune only")
    parser.add_argument("--sweep-only", action="store_true", help="no search: streamed reference pass + one sweep")
    parser.add_argument("--ctx", type=int, default=256, help="chunk length for --sweep-only")
    parser.add_argument("prune_args", nargs="*", help="extra prune options (after --)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.source:
        src = args.source
    else:
        two = build_checkpoint(args.out_dir / "llama-7b-2", 2)
        src = two if args.blocks == 2 else deepen(two, args.out_dir / f"llama-7b-{args.blocks}", args.blocks)
    log = args.out_dir / "bench_prune_cost.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = [sys.executable, "-c", "import sys; from shortquant.cli import main; sys.argv[0] = 'shortquant'; main()"]
    results = {}
    if args.sweep_only:
        results["sweep"] = measure("streamed reference pass + one sweep", [
            sys.executable, "-c", SWEEP_CODE, src, args.calib, args.ctx, args.threads], log, env)
        text = log.read_text(errors="replace")
        print(text[text.rindex("\n{") + 1:].strip())
        return
    if not args.skip_export:
        out = args.out_dir / "o_plain"
        results["export"] = measure("export -q q4_k_m", [*cli, "export", src, "-q", "q4_k_m", "--out", out,
                                                          "--quiet", "-t", args.threads, "--force"], log, env)
        shutil.rmtree(out, ignore_errors=True)
    report = args.out_dir / "prune.json"
    with open(log, "ab") as f:
        f.write(b"\n### prune --json goes to " + str(report).encode() + b"\n")
    results["prune"] = measure(f"prune --remove {args.remove}", [
        *cli, "prune", src, "--remove", args.remove, "--calib", args.calib, "-t", args.threads, "--json",
        *args.prune_args], log, env)
    # the prune child's stdout went to the log: its last JSON document is the report
    text = log.read_text(errors="replace")
    doc = json.loads(text[text.rindex("\n{\n") + 1:])
    report.write_text(json.dumps(doc, indent=2))
    cost = doc["cost"]
    print(f"\nprune: {cost.get('search_tokens')} search tokens, {cost.get('held_apart_tokens')} held apart, "
          f"pool {cost['pool']}, cut {cost.get('cut')}, streamed {cost['streamed']}, "
          f"predicted {cost['predicted_ratio_to_export']}x export; chose {doc['chosen']}")
    for stage, (wall, cpu, runs, count) in stages(cost["sweeps"]).items():
        per = f"{1000 * cpu / runs:6.2f} ms CPU a block-token run" if runs else ""
        print(f"  {stage:<18} {count:3d} sweeps {wall:8.1f} s wall {cpu:8.1f} s CPU {runs:9d} block-token runs  {per}")
    if "export" in results:
        e, p = results["export"], results["prune"]
        print(f"ratio prune/export: wall {p.wall_s / e.wall_s:.2f}x, CPU {p.cpu_s / e.cpu_s:.2f}x; "
              f"peak RSS {p.peak_rss_mb / 1024:.2f} GB (export {e.peak_rss_mb / 1024:.2f} GB)")


if __name__ == "__main__":
    main()
