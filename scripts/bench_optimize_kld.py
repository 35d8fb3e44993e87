#!/usr/bin/env python3
"""Benchmark of issue 23 item 4: --optimize against llama.cpp's mixes, measured by llama.cpp.

On a real checkpoint, one text split in two: its start is the calibration text (llama-imatrix
and the optimizer), the rest is held out (the KL divergence). Both sides get the same
importance matrix (llama-imatrix on the F16 export). For each mix (default q4_k_m, q3_k_m):

- ``llama.cpp``: shortquant's export of the standard mix (the same types llama-quantize picks);
- ``optimized``: ``--optimize`` (every tensor free, embedding and output included);
- ``blocks only``: ``--optimize --optimize-keep token_embd,output`` (the embedding and the output
  at llama.cpp's types for that mix, the budget spent on the blocks' tensors alone).

Every file is measured by ``llama-perplexity --kl-divergence`` against the F16 file's logits on
the held-out text (mean KLD +- error, same top-1), and the sizes compared.

    python scripts/bench_optimize_kld.py --model /tmp/smollm2-hf --out-dir /tmp/bench-kld
    python scripts/bench_optimize_kld.py --model /tmp/smollm2-hf --out-dir /tmp/bench-kld --reuse \\
        --variant probe30=max_probe_blocks:30      # one more blocks-only variant, files reused

Needs llama.cpp's llama-imatrix and llama-perplexity built for the installed llama-cpp-python
(``python scripts/llama_cpp_tools.py llama-imatrix llama-perplexity``). Results go to
<out-dir>/bench_optimize_kld.json as well.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_optimize import export, spend, tensor_types  # noqa: E402
from llama_cpp_tools import FINAL, KLD_MEAN, SAME_TOP, cached_tool  # noqa: E402

DEFAULT_TEXT = REPO.parent / "shared" / "fixtures" / "calibration-text.txt"
BLOCKS_ONLY = ("token_embd", "output")


def split_text(text: Path, at: int, out: Path) -> tuple[Path, Path]:
    """The calibration part (characters before ``at``) and the held-out part (from ``at`` on)."""
    whole = text.read_text(encoding="utf-8")
    if not 0 < at < len(whole):
        raise SystemExit(f"--split {at} is outside the text ({len(whole)} characters)")
    calib, held = out / "calib.txt", out / "heldout.txt"
    calib.write_text(whole[:at], encoding="utf-8")
    held.write_text(whole[at:], encoding="utf-8")
    return calib, held


def tool(name: str) -> Path:
    path = cached_tool(name=name)
    if path is None:
        raise SystemExit(f"{name} is not built: python scripts/llama_cpp_tools.py {name}")
    return path


def run(cmd: list[str], wanted) -> str:
    import tempfile

    for _attempt in range(3):   # llama.cpp logs from a thread: now and then its last lines are lost at exit
        # into a file, not a pipe: through a pipe whole runs' output was lost on a busy machine
        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.run(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, text=True)
            log.seek(0)
            output = log.read()
        if proc.returncode != 0 or wanted.search(output):
            break
    if proc.returncode != 0 or not wanted.search(output):
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}): {output.strip().splitlines()[-3:]}")
    return output


def llama_imatrix(f16: Path, calib: Path, out: Path, ctx: int, chunks: int, threads: int) -> Path:
    run([tool("llama-imatrix"), "-m", f16, "-f", calib, "-o", out, "-c", ctx, "--chunks", chunks, "-t", threads],
        re.compile(r"save|stored|imatrix", re.I))
    if not out.is_file():
        raise SystemExit(f"llama-imatrix wrote no {out}")
    return out


# llama-perplexity --kl-divergence prints one line per chunk with the running means; its closing
# summary is often lost at exit on a busy machine (it logs from a thread), the last chunk's line is
# the same mean over every chunk
CHUNKS = re.compile(r"computing over (\d+) chunks")
CHUNK_LINE = re.compile(r"^\s*(\d+)\s+[\d.]+ ± +[\d.]+\s+-?[\d.]+ ± +[\d.]+\s+(-?[\d.]+) ± +([\d.]+)"
                        r"\s+[\d.]+ ± +[\d.]+ %\s+([\d.]+) ± +[\d.]+ %", re.M)


class _LastChunk:
    """Matches output that holds the closing summary or the last chunk's line."""

    def search(self, output: str):
        total = CHUNKS.search(output)
        last = [m for m in CHUNK_LINE.finditer(output) if total and int(m.group(1)) == int(total.group(1))]
        return (KLD_MEAN.search(output) and SAME_TOP.search(output)) or (last[-1] if last else None)


def kld(model: Path, logits: Path, held: Path, ctx: int, threads: int) -> dict:
    """Mean KLD of ``model`` against the base logits, over every chunk the logits file holds
    (llama-perplexity takes their count from the file, not from --chunks)."""
    common = ["-f", held, "-c", ctx, "-t", threads, "--kl-divergence-base", logits]
    output = run([tool("llama-perplexity"), "-m", model, *common, "--kl-divergence"], _LastChunk())
    mean, same = KLD_MEAN.search(output), SAME_TOP.search(output)
    if mean and same:
        return {"mean": float(mean.group(1)), "err": float(mean.group(2)),
                "same_top1": float(same.group(1)) / 100}
    last = _LastChunk().search(output)
    return {"mean": float(last.group(2)), "err": float(last.group(3)), "same_top1": float(last.group(4)) / 100}


def parse_variant(text: str) -> tuple[str, dict]:
    """``name=key:value,key:value`` -> (name, OptimizeRequest fields); a blocks-only run.
    ``exclude:Q4_1+Q5_1`` (not a request field) takes those types out of the optimizer's candidates."""
    name, _, rest = text.partition("=")
    fields = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition(":")
        fields[key] = int(value) if value.isdigit() else tuple(value.split("+")) if key == "exclude" else value
    return name, fields


@contextmanager
def candidates_without(names: tuple[str, ...]):
    """The optimizer's candidate types less ``names`` (a type a standard mix uses stays a candidate)."""
    from gguf import GGMLQuantizationType as T

    from shortquant.quant import sensitivity

    saved = sensitivity.CANDIDATES_256, sensitivity.CANDIDATES_32
    drop = {T[n.upper()] for n in names}
    sensitivity.CANDIDATES_256, sensitivity.CANDIDATES_32 = (tuple(t for t in c if t not in drop) for c in saved)
    try:
        yield
    finally:
        sensitivity.CANDIDATES_256, sensitivity.CANDIDATES_32 = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text to split [calibration-text fixture]")
    parser.add_argument("--split", type=int, default=150_000, help="calibration = characters before this")
    parser.add_argument("--quant", "-q", action="append", default=None, help="mixes [q4_k_m, q3_k_m]")
    parser.add_argument("--ctx", type=int, default=512, help="llama-perplexity and llama-imatrix context")
    parser.add_argument("--chunks", type=int, default=8, help="held-out chunks llama-perplexity measures")
    parser.add_argument("--imatrix-chunks", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="export threads")
    parser.add_argument("--tool-threads", type=int, default=1,
                        help="llama-imatrix / llama-perplexity threads (1: on a shared machine two threads "
                             "wait on each other at every barrier)")
    parser.add_argument("--variant", action="append", default=[],
                        help="one more blocks-only run, NAME=FIELD:VALUE,... of OptimizeRequest "
                             "(e.g. probe30=max_probe_blocks:30)")
    parser.add_argument("--no-free", action="store_true", help="skip the run with embedding/output free")
    parser.add_argument("--no-blocks", action="store_true", help="skip the plain blocks-only run")
    parser.add_argument("--only", action="append", default=[], help="measure only these runs (repeatable)")
    parser.add_argument("--reuse", action="store_true", help="reuse files and KLDs already in --out-dir")
    parser.add_argument("--exports-only", action="store_true", help="write the files, measure nothing yet")
    parser.add_argument("--measure-only", action="store_true",
                        help="measure the files already written (beside an --exports-only run), export nothing")
    args = parser.parse_args(argv)

    from shortquant.quant.optimize import OptimizeRequest
    from shortquant.export import ExportOptions, make_model_plan
    from shortquant.source.checkpoint import open_checkpoint

    quants = args.quant or ["q4_k_m", "q3_k_m"]
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "bench_optimize_kld.json"
    state = json.loads(state_file.read_text()) if args.reuse and state_file.is_file() else {}
    files, seconds = state.get("files", {}), state.get("seconds", {})
    # KLDs in a file of their own (by file, context and chunks): a --measure-only process can fill
    # it while an --exports-only one writes the state
    kld_file = out / "klds.json"
    klds = json.loads(kld_file.read_text()) if args.reuse and kld_file.is_file() else {}

    def save():
        if not args.measure_only:
            state.update(files=files, seconds=seconds)
            state_file.write_text(json.dumps(state, indent=2))

    calib, held = split_text(args.text, args.split, out)
    if "f16" not in files:
        report, _ = export(args.model, out / "f16", ["f16"], None, threads=args.threads)
        files["f16"] = str(report.files[0].path)
    f16 = Path(files["f16"])
    imatrix = out / "model.imatrix.gguf"
    if not imatrix.is_file() or not args.reuse:
        tick = time.perf_counter()
        llama_imatrix(f16, calib, imatrix, args.ctx, args.imatrix_chunks, args.tool_threads)
        seconds["imatrix"] = time.perf_counter() - tick
    if "llama.cpp" not in files:
        report, seconds["llama.cpp"] = export(args.model, out / "standard", quants, imatrix, threads=args.threads)
        files["llama.cpp"] = [str(f.path) for f in report.files]
    save()

    logits = out / "f16.logits.bin"
    if not args.exports_only and (not logits.is_file() or not args.reuse):
        run([tool("llama-perplexity"), "-m", f16, "-f", held, "-c", args.ctx, "--chunks", args.chunks,
             "-t", args.tool_threads, "--kl-divergence-base", logits], FINAL)

    def key(path):
        return f"{path} ctx {args.ctx} chunks {args.chunks}"

    def measure(name):
        if args.only and name not in args.only:
            return
        for path in files.get(name, []) if not args.exports_only else ():
            if key(path) not in klds:
                klds[key(path)] = kld(Path(path), logits, held, args.ctx, args.tool_threads)
                if kld_file.is_file():   # another --measure-only process may have added its own
                    klds.update({**json.loads(kld_file.read_text()), key(path): klds[key(path)]})
                kld_file.write_text(json.dumps(klds, indent=2))

    measure("llama.cpp")
    runs = [] if args.no_free else [("optimized", {})]
    runs += [] if args.no_blocks else [("blocks only", {"keep": BLOCKS_ONLY})]
    runs += [(name, {"keep": BLOCKS_ONLY, **fields}) for name, fields in map(parse_variant, args.variant)]
    for name, fields in runs:   # each run measured as soon as it is written
        record = out / name.replace(" ", "-").replace(",", "") / "run.json"   # one per run: runs may go in parallel
        if args.reuse and record.is_file():
            done = json.loads(record.read_text())
            files[name], seconds[name] = done["files"], done["seconds"]
            state.setdefault("notes", {})[name] = done["notes"]
        if name not in files and not args.measure_only:
            fields = dict(fields)
            exclude = fields.pop("exclude", ())
            request = OptimizeRequest(calib=calib, optimize=True, **fields)
            with candidates_without(exclude):
                report, seconds[name] = export(args.model, record.parent, quants, imatrix, request,
                                               threads=args.threads)
            files[name] = [str(f.path) for f in report.files]
            state.setdefault("notes", {})[name] = [n for o in report.optimized for n in o.notes]
            record.write_text(json.dumps({"files": files[name], "seconds": seconds[name],
                                          "notes": state["notes"][name], "fields": repr(fields)}, indent=2))
            save()
        measure(name)
    names = ["llama.cpp"] + [name for name, _ in runs]
    if args.exports_only or args.measure_only:
        return 0

    plan = make_model_plan(open_checkpoint(args.model), ExportOptions())
    print(f"model {args.model} ({plan.n_params:,} parameters); calibration: {args.text.name}[:{args.split}] "
          f"(imatrix {args.imatrix_chunks} x {args.ctx} tokens, same file both sides); held-out: "
          f"[{args.split}:], {args.chunks} chunks of {args.ctx} tokens; KLD by llama-perplexity vs the F16 file")
    print()
    print("| mix | run | bytes | bpw | mean KLD | same top-1 | KLD vs llama.cpp |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for i, quant in enumerate(quants):
        base = None
        for name in names:
            path = Path(files[name][i])
            k = klds[key(path)]
            size = path.stat().st_size
            base = k["mean"] if base is None else base
            delta = "" if name == "llama.cpp" else f"{(k['mean'] / base - 1) * 100:+.1f}%"
            rows.append({"mix": quant, "run": name, "file": path.name, "bytes": size, "kld": k, "delta": delta})
            print(f"| {quant} | {name} | {size:,} | {size * 8 / plan.n_params:.3f} | {k['mean']:.5f} ± {k['err']:.5f} "
                  f"| {k['same_top1'] * 100:.2f}% | {delta} |")
    print()
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    for name in names[1:]:
        for i, quant in enumerate(quants):
            groups = spend(plan, tensor_types(Path(files["llama.cpp"][i])), tensor_types(Path(files[name][i])))
            print(f"{quant} {name}: " + "; ".join(f"{k} {v['bpw_standard']:.2f} -> {v['bpw_optimized']:.2f}"
                                                   for k, v in groups.items() if k.startswith("kind")))
    for name, notes in state.get("notes", {}).items():
        for note in notes:
            print(f"note ({name}): {note}")
    state["rows"] = rows
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
