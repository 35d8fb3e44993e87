#!/usr/bin/env python3
"""Compare shortquant's perplexity with llama.cpp's own llama-perplexity on one file + text.

Builds llama-perplexity from the installed llama-cpp-python's source package the first time
(scripts/llama_cpp_tools.py: the sdist, a cmake build of that one target; several minutes on 2
cores), cached under ~/.cache/shortquant/llama.cpp-<version>/. Then runs both and prints both
"Final estimate" lines.

    python scripts/perplexity_vs_llama_cpp.py model.gguf --text wiki.test.raw --ctx 512
"""

from __future__ import annotations

import argparse
import sys

from llama_cpp_tools import cached_tool, ensure_tools, run_llama_perplexity   # beside this script
from shortquant.evaluate.perplexity import DEFAULT_TEXT, open_for_eval, perplexity, read_text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="GGUF file")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="evaluation text (default: built-in)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=2, help="parallel build jobs")
    args = parser.parse_args()

    tool = cached_tool() or ensure_tools(("llama-perplexity",), jobs=args.jobs).binaries["llama-perplexity"]
    ref_ppl, ref_err = run_llama_perplexity(tool, args.model, args.text, args.ctx, args.threads)
    with open_for_eval(args.model, args.ctx, args.threads) as model:
        ours = perplexity(model, read_text(args.text), args.ctx)

    print(f"llama-perplexity : Final estimate: PPL = {ref_ppl:.4f} +/- {ref_err:.5f}")
    print(f"shortquant       : Final estimate: PPL = {ours.ppl:.4f} +/- {ours.err:.5f}")
    same = f"{ref_ppl:.4f}" == f"{ours.ppl:.4f}"
    print(f"same to 4 decimals: {'yes' if same else 'no'} (ours unrounded: {ours.ppl:.7f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
