#!/usr/bin/env python3
"""Benchmark of issue 10: optimized type mixes against llama.cpp's, at no larger file size.

For each model: an importance matrix from the calibration text (``shortquant imatrix``), then
with that same imatrix an F32 base, llama.cpp's mixes (default q4_k_m, q3_k_m, q2_k) and their
``--optimize`` variants (one measurement for the whole ladder), each timed. Every file is then
measured against the F32 file on a held-out text that neither the imatrix nor the optimizer saw:
size, bpw, mean KLD +- error, 99th percentile KLD, same top-1, PPL. Also prints where the
optimizer moved bits (by tensor kind, by distance to a removed block) and the cost of
--optimize against a plain export of the same mixes.

    python scripts/bench_optimize.py --model models/demo --out-dir /tmp/bench-opt
    python scripts/bench_optimize.py --model /path/to/unpruned --out-dir /tmp/bench-opt-full \\
        --calib ../shared/fixtures/calibration-text.txt --text shortquant/evaluate/data/eval_text.txt
    python scripts/bench_optimize.py --model /tmp/bench/llama-7b-shapes-4blk --out-dir /tmp/bench-opt-7b \\
        --quant q4_k_m --cost-only      # the cost on bench_export.py's LLaMA-7B-shaped checkpoint

Results go to <out-dir>/bench_optimize.json as well.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CALIB = REPO.parent / "shared" / "fixtures" / "calibration-text.txt"


def make_imatrix(model: Path, calib: Path, out: Path, ctx: int, chunks: int) -> Path:
    """What ``shortquant imatrix MODEL`` computes (the same model, the same tokens)."""
    from shortquant.families.hf_model import load_torch_model
    from shortquant.quant.imatrix import compute_imatrix, write_imatrix
    from shortquant.tokenizer.encode import encode_text

    tokens, bos = encode_text(model, calib.read_text(encoding="utf-8"))
    im = compute_imatrix(load_torch_model(model), tokens, ctx=ctx, chunks=chunks, bos_id=bos,
                         dataset=calib.name, progress=False)
    write_imatrix(out, im)
    return out


def export(model: Path, out: Path, quants, imatrix: Path, request=None, threads=None, recipe=None):
    from shortquant.export import ExportOptions, export as run

    options = ExportOptions(quants=tuple(quants), out_dir=out, imatrix=imatrix, quiet=True, threads=threads,
                            optimize=request, recipe=recipe)
    start = time.perf_counter()
    report = run(model, options)
    return report, time.perf_counter() - start


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def spend(plan, standard: dict[str, str], optimized: dict[str, str]) -> dict:
    """Bits per weight of each tensor kind and of each cut distance, standard vs optimized."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    from shortquant.quant.mixes import tensor_role
    from shortquant.quant.optimize import block_of, cut_distance

    dist = cut_distance(plan)
    groups: dict[str, list[float]] = {}
    for t in plan.tensors:
        if len(t.shape) < 2:
            continue
        bits = []
        for types in (standard, optimized):
            block, size = GGML_QUANT_SIZES[T[types[t.name]]]
            bits.append(t.n_elements // block * size * 8)
        block = block_of(t.name)
        keys = [f"kind {tensor_role(t.name)}"]
        if block is not None:
            keys.append(f"cut distance {dist[block]}" if dist[block] is not None else "cut distance ?")
        for key in keys:
            g = groups.setdefault(key, [0, 0, 0])
            g[0] += t.n_elements
            g[1] += bits[0]
            g[2] += bits[1]
    return {k: {"bpw_standard": v[1] / v[0], "bpw_optimized": v[2] / v[0]} for k, v in sorted(groups.items())}


def make_files(args, quants, recipe) -> dict:
    """The imatrix, the F32 base, llama.cpp's mixes and the optimized ones (timed)."""
    from shortquant.quant.optimize import OptimizeRequest

    out = args.out_dir
    imatrix = make_imatrix(args.model, args.calib, out / "model.imatrix.gguf", args.calib_ctx, args.imatrix_chunks)
    base_report = None
    if not args.cost_only:
        base_report, _ = export(args.model, out / "base", ["f32"], imatrix, threads=args.threads, recipe=recipe)
    std_report, std_seconds = export(args.model, out / "standard", quants, imatrix, threads=args.threads,
                                     recipe=recipe)
    request = OptimizeRequest(calib=args.calib, optimize=True, ctx=args.calib_ctx, probe_chunks=args.probe_chunks,
                              verify_chunks=args.verify_chunks, probe_from=args.probe_from)
    opt_report, opt_seconds = export(args.model, out / "optimized", quants, imatrix, request, threads=args.threads,
                                     recipe=recipe)
    return {"base": str(base_report.files[0].path) if base_report else None,
            "standard": [str(f.path) for f in std_report.files],
            "optimized": [str(f.path) for f in opt_report.files],
            "optimized_flags": [o.optimized for o in opt_report.optimized],
            "seconds": {"standard": std_seconds, "optimize": opt_seconds},
            "notes": [n for o in opt_report.optimized for n in o.notes],
            "stages": opt_report.optimized[0].seconds if opt_report.optimized else {},
            # the process's peak RSS at each stage's end (this process also ran the imatrix and the plain export)
            "peak_rss_mb": opt_report.optimized[0].as_dict()["peak_rss_mb"] if opt_report.optimized else {},
            "probe_from": opt_report.optimized[0].probe_from if opt_report.optimized else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIB, help="calibration text (imatrix + optimizer)")
    parser.add_argument("--text", type=Path, default=None, help="held-out text [built-in evaluation text]")
    parser.add_argument("--quant", action="append", default=None, help="mixes [q4_k_m, q3_k_m, q2_k]")
    parser.add_argument("--ctx", type=int, default=128, help="evaluation context")
    parser.add_argument("--calib-ctx", type=int, default=256)
    parser.add_argument("--probe-chunks", type=int, default=None, help="[2 up to 0.5 B parameters, else 1]")
    parser.add_argument("--verify-chunks", type=int, default=None, help="[2 up to 0.5 B parameters, else 1]")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--probe-from", default="auto", choices=["auto", "memory", "disk"])
    parser.add_argument("--imatrix-chunks", type=int, default=64, help="calibration chunks for the imatrix")
    parser.add_argument("--cost-only", action="store_true",
                        help="time the plain and the optimized export only (no F32 base, no evaluation)")
    parser.add_argument("--reuse", action="store_true", help="reuse the files of an earlier run in --out-dir")
    parser.add_argument("--recipe", default=None,
                        help="recipe (provenance of the pruning) [shortquant-demo for the demo model]")
    args = parser.parse_args(argv)

    from shortquant.evaluate.perplexity import DEFAULT_TEXT
    from shortquant.evaluate.runner import evaluate_files
    from shortquant.export import make_model_plan, ExportOptions
    from shortquant.recipes import load_recipe
    from shortquant.source.checkpoint import open_checkpoint

    quants = args.quant or ["q4_k_m", "q3_k_m", "q2_k"]
    text = args.text or DEFAULT_TEXT
    if text.resolve() == args.calib.resolve():
        parser.error("the held-out text must not be the calibration text")
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    recipe_name = args.recipe or ("shortquant-demo" if args.model.resolve() == (REPO / "models" / "demo").resolve()
                                  else None)
    recipe = load_recipe(recipe_name) if recipe_name else None
    stage = out / "exports.json"
    if args.reuse and stage.is_file():
        made = json.loads(stage.read_text())
    else:
        made = make_files(args, quants, recipe)
        stage.write_text(json.dumps(made, indent=2))
    std_seconds, opt_seconds = made["seconds"]["standard"], made["seconds"]["optimize"]
    if args.cost_only:
        print(f"cost: plain export of {', '.join(quants)} {std_seconds:.1f} s; with --optimize {opt_seconds:.1f} s "
              f"({opt_seconds / std_seconds:.2f}x); same imatrix, {args.threads or 'default'} threads")
        print("optimizer stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in made.get("stages", {}).items()))
        print(f"peak RSS at each stage's end (probe from {made.get('probe_from')}): "
              + ", ".join(f"{k} {v} MB" for k, v in made.get("peak_rss_mb", {}).items()))
        for note in made["notes"]:
            print("note:", note)
        (out / "bench_optimize_cost.json").write_text(json.dumps(made, indent=2))
        return 0

    paths = [Path(p) for p in made["standard"]] + [Path(p) for p in made["optimized"]]
    results = evaluate_files(paths, text, args.ctx, Path(made["base"]), threads=args.threads)
    by_name = {Path(f["path"]).name: f for f in results["files"]}
    plan = make_model_plan(open_checkpoint(args.model), ExportOptions(recipe=recipe))

    rows, spends = [], {}
    for quant, std_path, opt_path, optimized in zip(quants, made["standard"], made["optimized"], made["optimized_flags"]):
        for path, kind in ((Path(std_path), "llama.cpp"), (Path(opt_path), "optimized" if optimized else "fallback")):
            r = by_name[path.name]
            rows.append({"mix": quant, "kind": kind, "file": path.name, "bytes": r["bytes"],
                         "bpw": r["bytes"] * 8 / plan.n_params, "kld": r["kld"]["mean"], "kld_err": r["kld"]["err"],
                         "kld_p99": r["kld"]["p99"], "same_top1": r["kld"]["same_top1"], "ppl": r["ppl"],
                         "ppl_err": r["ppl_err"]})
        spends[quant] = spend(plan, tensor_types(Path(std_path)), tensor_types(Path(opt_path)))

    print(f"model {args.model} ({plan.n_params:,} parameters, blocks "
          f"{plan.block_map.block_count}{' of ' + str(plan.block_map.source_block_count) if plan.block_map.source_block_count else ''}); "
          f"calibration {args.calib.name}; held-out {text.name}; ctx {args.ctx}; imatrix from calibration")
    print()
    print("| mix | file | bytes | bpw | mean KLD | 99% KLD | same top-1 | PPL | KLD vs llama.cpp |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        delta = "" if i % 2 == 0 else f"{(r['kld'] / rows[i - 1]['kld'] - 1) * 100:+.1f}%"
        print(f"| {r['mix']} | {r['kind']} | {r['bytes']:,} | {r['bpw']:.3f} | {r['kld']:.5f} ± {r['kld_err']:.5f} "
              f"| {r['kld_p99']:.4f} | {r['same_top1'] * 100:.2f}% | {r['ppl']:.4f} ± {r['ppl_err']:.4f} | {delta} |")
    print()
    print(f"cost: plain export of {', '.join(quants)} {std_seconds:.1f} s; with --optimize {opt_seconds:.1f} s "
          f"({opt_seconds / std_seconds:.1f}x)")
    for note in made["notes"]:
        print("note:", note)
    print()
    for quant, groups in spends.items():
        print(f"{quant}: " + "; ".join(f"{k} {v['bpw_standard']:.2f} -> {v['bpw_optimized']:.2f}"
                                       for k, v in groups.items()))
    (out / "bench_optimize.json").write_text(json.dumps(
        {"model": str(args.model), "calib": str(args.calib), "text": str(text), "ctx": args.ctx, "rows": rows,
         "seconds": {"standard": std_seconds, "optimize": opt_seconds}, "spend": spends,
         "notes": made["notes"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
