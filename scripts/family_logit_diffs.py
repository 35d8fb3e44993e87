#!/usr/bin/env python3
"""How far llama.cpp's logits are from transformers' for every family, layout and type.

Uses the family test cases (``tests/test_families.py``: Llama-3 with llama3 rope and an explicit
head_dim, Llama-3.2-style tied, Qwen2 with biases, Qwen3, Mistral), each contiguous and pruned
(gaps + a stale config), exports f32/f16/q8_0/q4_k_m with ``shortquant export`` and prints
max |llama.cpp - transformers| over a fixed 20-token sequence, absolute and as % of the largest logit.

    python scripts/family_logit_diffs.py [--out /tmp/family-logit-diffs]
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

from llama_eval import gguf_logits, hf_logits  # noqa: E402
from test_families import CASES, LAYOUTS, TOKENS, make_case  # noqa: E402

TYPES = ("f32", "f16", "q8_0", "q4_k_m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/family-logit-diffs"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    print(f"| case | layout | scale |" + "".join(f" {t.upper()} |" for t in TYPES))
    print("|---|---|---|" + "---|" * len(TYPES))
    for case in CASES:
        for layout in LAYOUTS:
            model, src, pre = make_case(args.out, case, layout)
            dest = args.out / "gguf" / f"{case}-{layout}"
            command = ["shortquant", "export", str(src), "--out", str(dest), "--quiet", *pre]
            for quant in TYPES:
                command += ["--quant", quant]
            subprocess.run(command, check=True)
            reference = hf_logits(model, TOKENS)
            scale = float(np.abs(reference).max())
            cells = []
            for quant in TYPES:
                diff = float(np.abs(gguf_logits(next(dest.glob(f"*-{quant.upper()}.gguf")), TOKENS) - reference).max())
                cells.append(f" {diff:.1e} ({100 * diff / scale:.2f} %) |")
            print(f"| {case} | {layout} | {scale:.2f} |" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
