#!/usr/bin/env python3
"""Zero-padding pruned FFN widths to a multiple of 256: file size and KLD, with and without.

Width-prunes the demo model's FFNs (each block keeps its channels of largest
|gate| * |up| * |down| norm, a different count per block; the original config is kept, as
LLM-Pruner leaves it), exports each K-quant mix with ``--pad-ffn 0`` and ``--pad-ffn 256``, and
measures against the f32 file with llama.cpp: mean KL divergence of the next-token
distributions over the evaluation text, and the file size.

    nice python scripts/bench_ffn_padding.py [--out /tmp/ffn-padding] [--chunks 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo"
EVAL_TEXT = REPO / "shortquant" / "evaluate" / "data" / "eval_text.txt"
WIDTHS = [740, 700, 650, 600, 560, 520]   # of 768: every block its own width, none a multiple of 256
QUANTS = ["q3_k_m", "q4_k_m", "q5_k_m", "q6_k"]


def width_prune(dst: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {k: v.float() for k, v in load_file(str(DEMO / "model.safetensors")).items()}
    for i, width in enumerate(WIDTHS):
        p = f"model.layers.{i}.mlp."
        gate, up, down = tensors[p + "gate_proj.weight"], tensors[p + "up_proj.weight"], tensors[p + "down_proj.weight"]
        score = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
        keep = torch.argsort(score, descending=True)[:width].sort().values
        tensors[p + "gate_proj.weight"], tensors[p + "up_proj.weight"] = gate[keep].contiguous(), up[keep].contiguous()
        tensors[p + "down_proj.weight"] = down[:, keep].contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in DEMO.iterdir():
        if f.suffix != ".safetensors" and f.name != "README.md":
            shutil.copy(f, dst / f.name)


def logits(path: Path, chunks: list[list[int]]) -> list[np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=len(chunks[0]), n_batch=len(chunks[0]), logits_all=True,
                          verbose=False, n_threads=2)
    out = []
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk)
        out.append(np.array(llm.scores[:len(chunk)], dtype=np.float64))
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def mean_kld(base: list[np.ndarray], other: list[np.ndarray]) -> float:
    total = [((np.exp(lp := log_softmax(b))) * (lp - log_softmax(o))).sum(axis=-1).mean()
             for b, o in zip(base, other)]
    return float(np.mean(total))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/ffn-padding"))
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    args = ap.parse_args()
    src = args.out / "src"
    width_prune(src)
    import llama_cpp

    results = []
    for pad in (0, 256):
        out = args.out / f"pad{pad}"
        cmd = [sys.executable, "-c", "from shortquant.cli import main; main()", "export", str(src), "--out", str(out), "--pad-ffn", str(pad),
               "--quiet", "-q", "f32", *(a for q in QUANTS for a in ("-q", q))]
        subprocess.run(cmd, check=True)
        f32 = next(out.glob("*-F32.gguf"))
        if pad == 0:
            vocab = llama_cpp.Llama(str(f32), vocab_only=True, verbose=False)
            tokens = vocab.tokenize(EVAL_TEXT.read_text(encoding="utf-8").encode(), add_bos=True)
            chunks = [tokens[i * args.ctx:(i + 1) * args.ctx] for i in range(args.chunks)]
            base = logits(f32, chunks)
        for q in QUANTS:
            path = next(out.glob(f"*-{q.upper()}.gguf"))
            results.append({"pad": pad, "quant": q, "bytes": path.stat().st_size,
                            "kld": mean_kld(base, logits(path, chunks))})
    print(f"widths {WIDTHS} of 768 (demo model, d=256); KLD vs the unpadded f32 file, "
          f"{args.chunks} x {args.ctx} tokens")
    print(f"{'type':<8} {'bytes (pad 0)':>14} {'bytes (pad 256)':>16} {'KLD (pad 0)':>12} {'KLD (pad 256)':>14}")
    for q in QUANTS:
        a, b = (next(r for r in results if r["quant"] == q and r["pad"] == p) for p in (0, 256))
        print(f"{q:<8} {a['bytes']:>14,} {b['bytes']:>16,} {a['kld']:>12.5f} {b['kld']:>14.5f}")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
