#!/usr/bin/env python3
"""Issue 20's layout x family matrix: do the jobs that run the Hugging Face model see the model
export writes?

For every case of tests/reader_cases.py (tiny checkpoints: contiguous, gaps, stale
num_hidden_layers, sharded .bin, sharded bf16, width-pruned, attention/MLP dropped, DeciLM,
Llama-3 / Qwen2 / Qwen3 / Mistral with gaps) it exports F32 (``--pad-ffn 0``) and measures
``eval F32.gguf --base FOLDER`` (mean KLD and same top-1 of the file against its own source: 0 when
both are the same model) and ``imatrix FOLDER`` against ``imatrix F32.gguf`` (llama.cpp's forward):
entries only one of them has (deci's zero stand-ins left out) and the largest relative difference
of a shared entry. ``--tree`` runs another checkout's shortquant on the same builders:

    python scripts/reader_matrix.py                                   # this checkout
    git worktree add --detach /tmp/before f933246
    python scripts/reader_matrix.py --tree /tmp/before --out /tmp/matrix-before
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CTX, CHUNKS = 32, 4


def measure(case: str, build, tmp: Path, main, text: str) -> dict:
    import numpy as np
    from click.testing import CliRunner

    from shortquant.export import ExportOptions, make_model_plan
    from shortquant.quant.imatrix import read_imatrix
    from shortquant.source.checkpoint import open_checkpoint

    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        if result.exit_code:
            raise RuntimeError((result.stderr or result.output).strip().splitlines()[-1])
        return result

    src = tmp / case / "src"
    extra = build(src)
    run("export", src, "--out", tmp / case / "out", "-q", "f32", "--pad-ffn", "0", "--quiet", *extra)
    f32 = next((tmp / case / "out").glob("*-F32.gguf"))
    row: dict = {"case": case}
    try:
        res = run("eval", f32, "--base", src, "--ctx", 64, "--chunks", 4, "--threads", 2, "--cache-dir",
                  tmp / case / "cache", "--json", "--quiet")
        kld = json.loads(res.stdout)["files"][0]["kld"]
        row.update(kld=kld["mean"], same_top1=kld["same_top1"])
    except RuntimeError as exc:
        row["eval_error"] = str(exc)
    calib = tmp / "calib.txt"
    calib.write_text(text, encoding="utf-8")
    try:
        ims = {}
        for name, model in (("torch", src), ("llama", f32)):
            out = tmp / case / f"{name}.imatrix.gguf"
            run("imatrix", model, "--text", calib, "-o", out, "--ctx", CTX, "--chunks", CHUNKS, "--threads", 2,
                "--quiet")
            ims[name] = read_imatrix(out)
        plan = make_model_plan(open_checkpoint(src), ExportOptions(pad_ffn=0, pre=extra[1] if extra else None))
        stand_ins = {t.name for t in plan.tensors if t.fill is not None}
        ours, theirs = ims["torch"].sums, ims["llama"].sums
        shared = sorted(set(ours) & set(theirs))
        worst = max((float(np.max(np.abs(ours[n] - theirs[n]) / np.abs(theirs[n]))) if ours[n].shape == theirs[n].shape
                     else float("inf") for n in shared), default=float("nan"))
        norm = max((float(np.linalg.norm(ours[n] - theirs[n]) / np.linalg.norm(theirs[n]))
                    if ours[n].shape == theirs[n].shape else float("inf") for n in shared), default=float("nan"))
        exact = f32_cache_imatrix(f32, text).sums   # llama.cpp without its f16 KV cache
        row["imatrix_max_rel_f32_cache"] = max(
            (float(np.max(np.abs(ours[n] - exact[n]) / np.abs(exact[n]))) if ours[n].shape == exact[n].shape
             else float("inf") for n in sorted(set(ours) & set(exact))), default=float("nan"))
        row.update(imatrix_only_torch=len(set(ours) - set(theirs)), imatrix_norm_rel=norm,
                   imatrix_only_llama=len(set(theirs) - set(ours) - stand_ins),
                   imatrix_entries=len(theirs) - len(stand_ins & set(theirs)), imatrix_max_rel=worst)
    except RuntimeError as exc:
        row["imatrix_error"] = str(exc)
    return row


def f32_cache_imatrix(f32: Path, text: str):
    """``imatrix F32.gguf`` with llama.cpp's KV cache in F32 and flash attention off (llama-imatrix's
    defaults are an F16 cache and flash attention where it can): then its forward is float32 end
    to end, as torch's."""
    import llama_cpp

    from shortquant.quant.imatrix_llama import compute_imatrix_gguf, gguf_tokens

    default = llama_cpp.llama_context_default_params

    def f32_cache():
        params = default()
        params.type_k = params.type_v = 0   # GGML_TYPE_F32
        params.flash_attn_type = 0          # LLAMA_FLASH_ATTN_TYPE_DISABLED
        return params

    llama_cpp.llama_context_default_params = f32_cache
    try:
        return compute_imatrix_gguf(f32, gguf_tokens(f32, text), ctx=CTX, chunks=CHUNKS, threads=2, progress=False)
    finally:
        llama_cpp.llama_context_default_params = default


def table(rows) -> str:
    lines = ["| case | eval --base: mean KLD | same top-1 | imatrix entries only in torch / only in llama.cpp "
             "(of N) | imatrix: largest entry's relative error (L2) | largest value's relative error | "
             "the same against llama.cpp with an F32 KV cache |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ev = (f"{r['kld']:.2e} | {r['same_top1'] * 100:.1f} %" if "kld" in r
              else f"error: {r['eval_error'][:70]} | -")
        im = (f"{r['imatrix_only_torch']} / {r['imatrix_only_llama']} (of {r['imatrix_entries']}) | "
              f"{r['imatrix_norm_rel']:.2e} | {r['imatrix_max_rel']:.2e} | {r['imatrix_max_rel_f32_cache']:.2e}"
              if "imatrix_max_rel" in r else f"error: {r.get('imatrix_error', '')[:70]} | - | - | -")
        lines.append(f"| {r['case']} | {ev} | {im} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="The checkout whose shortquant runs.")
    parser.add_argument("--out", type=Path, default=None, help="Keep the files here (default: a temp folder).")
    parser.add_argument("--case", action="append", help="Only these cases (repeatable).")
    args = parser.parse_args()
    sys.path[:0] = [str(args.tree), str(REPO / "tests")]   # the builders are always this checkout's
    import torch

    from reader_cases import CASES, TEXT
    from shortquant.cli import main as cli

    torch.set_num_threads(2)
    tmp = args.out or Path(tempfile.mkdtemp(prefix="reader-matrix-"))
    rows = []
    for case, build in CASES.items():
        if args.case and case not in args.case:
            continue
        rows.append(measure(case, build, tmp, cli, TEXT))
        print(json.dumps(rows[-1]), flush=True)
    (tmp / "reader_matrix.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
