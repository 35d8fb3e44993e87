#!/usr/bin/env python3
"""How far llama.cpp's logits are from transformers' for our exports, per layout and type.

Builds one seeded tiny LLaMA with transformers (the test suite's builders), saves it in each
pruned layout (contiguous, gapped + sharded, stale config, .bin), exports f32/f16/bf16/q8_0 with
`shortquant export`, and prints max |llama.cpp - transformers| over a fixed token sequence.
The same model in every layout, so identical rows mean the layout changed nothing.

    python scripts/logit_diffs.py [--out /tmp/logit-diffs]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from checkpoints import TinySpec, build_model, edit_config, rename_layers, save_model  # noqa: E402
from llama_eval import gguf_logits, hf_logits  # noqa: E402

TOKENIZER = REPO / "models" / "demo" / "tokenizer.model"
TOKENS = [1, 17, 250, 3, 99, 411, 7, 128, 300, 45, 6, 2, 77, 500, 31, 260]
TYPES = ("f32", "f16", "bf16", "q8_0")
LAYOUTS = {
    "contiguous safetensors": {},
    "gapped + sharded safetensors": dict(gaps=[0, 1, 3, 4], shard="200KB"),
    "stale config, .bin": dict(safe=False, config_layers=6),
    "gapped + sharded .bin": dict(safe=False, shard="200KB", gaps=[0, 2, 5, 7], config_layers=8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/logit-diffs"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    model = build_model(TinySpec(vocab_size=512, extra={"initializer_range": 0.05}))
    reference = hf_logits(model, TOKENS)
    scale = float(np.abs(reference).max())
    print(f"logit scale (max |logit|): {scale:.3f}")
    print(f"{'layout':<30}" + "".join(f"{t.upper():>22}" for t in TYPES))
    for name, layout in LAYOUTS.items():
        folder = args.out / name.replace(" ", "_").replace(",", "").replace("+", "and").replace(".", "")
        src = save_model(model, folder / "src", safe=layout.get("safe", True), max_shard_size=layout.get("shard"),
                         tokenizer_model=TOKENIZER)
        if "gaps" in layout:
            rename_layers(src, dict(enumerate(layout["gaps"])))
        if "config_layers" in layout:
            edit_config(src, num_hidden_layers=layout["config_layers"])
        command = ["shortquant", "export", str(src), "--out", str(folder / "gguf"), "--quiet"]
        for quant in TYPES:
            command += ["--quant", quant]
        subprocess.run(command, check=True)
        cells = []
        for quant in TYPES:
            path = next((folder / "gguf").glob(f"*-{quant.upper()}.gguf"))
            diff = float(np.abs(gguf_logits(path, TOKENS) - reference).max())
            cells.append(f"{diff:.2e} ({100 * diff / scale:.2f} %)")
        print(f"{name:<30}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
