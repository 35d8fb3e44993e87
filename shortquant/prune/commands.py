"""``shortquant prune``: measure, choose, print why, then export (and/or save) the pruned model."""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

import click

from .criteria import CRITERIA
from .frontier import frontier_options
from .search import Choice

HOW = {"swaps": "greedy search on calibration PPL refined by exchanges, checked against the one-shot choices on "
                "held-apart chunks",
       "greedy": "greedy search on calibration PPL, checked against the one-shot choices on held-apart chunks",
       "bi": "Block Influence (ShortGPT), one-shot",
       "ppl": "PPL criterion (Shortened LLaMA), one-shot",
       "taylor": "Taylor+ (Shortened LLaMA), one-shot"}


@click.command("prune")
@click.option("--remove", "-k", "count", type=click.IntRange(min=1), metavar="K",
              help="How many blocks to remove (with --budget: the most the frontier tries, "
                   "default a quarter of the blocks).")
@click.option("--calib", type=click.Path(path_type=Path, dir_okay=False, exists=True), required=True,
              help="Calibration text (prose of the kind the model serves); never the text you evaluate on.")
@click.option("--criterion", type=click.Choice(["greedy", *CRITERIA]), default="greedy", show_default=True,
              help="How to choose: greedy (remove the cheapest, re-measure the rest, then exchange removed "
                   "and kept blocks while that lowers the PPL), bi (ShortGPT Block "
                   "Influence), ppl (each block removed alone), taylor (Taylor+ weight x gradient).")
@click.option("--ctx", type=click.IntRange(min=16), default=None, metavar="N",
              help="Calibration chunk length [default: 256; on a big deep model the searched chunk is "
                   "shorter, so the run stays near 3 plain exports: see the README's prune cost].")
@click.option("--chunks", type=click.IntRange(min=2), default=None, metavar="N",
              help="At most this many calibration chunks [default: 16; 2 (one searched, one held apart) "
                   "on a big deep model].")
@click.option("--held-apart", type=click.IntRange(min=1), default=None, metavar="N",
              help="Chunks kept apart from the search to check its steps and pick the final set "
                   "[default: a quarter of the chunks].")
@click.option("--pool", type=click.IntRange(min=1), default=None, metavar="N",
              help="The greedy search and its exchanges choose among the N blocks cheapest by one-shot "
                   "PPL [default: 2K, at least K+4, at most every block; K + K/4 (at least K+2) on a big deep model].")
@click.option("--taylor/--no-taylor", default=None,
              help="Score Taylor+ too (a backward pass; only a table column unless --criterion taylor) "
                   "[default: yes, no on a big deep model].")
@click.option("--quant", "-q", "quants", multiple=True, metavar="TYPE",
              help="Export the pruned model to this GGUF type (repeatable), as `export --remove-blocks` would.")
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=Path), default=Path("gguf"), show_default=True,
              help="Folder for the GGUF files.")
@click.option("--save-hf", type=click.Path(path_type=Path, file_okay=False),
              help="Also write the pruned Hugging Face checkpoint here (safetensors + config), e.g. to retrain.")
@click.option("--threads", "-t", type=click.IntRange(min=1), help="Torch and quantization threads.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores, the choices and the files as JSON.")
@frontier_options
def prune_command(count, calib, criterion, ctx, chunks, held_apart, pool, taylor, quants, out_dir, save_hf, threads,
                  quiet, as_json, budget, heldout, eval_ctx, eval_chunks, **source):
    """Choose K blocks of SOURCE to remove by measuring it on calibration text, then export it.

    SOURCE is read as `export` reads it (the same --recipe, --source-blocks, --pre, ... options);
    without it, the embedded demo model. Every block is scored by three criteria (ShortGPT's Block
    Influence, the PPL of the model without it, Taylor+ importance); the default greedy search
    removes one block at a time, re-measuring the rest, then exchanges a removed block for a kept
    one while that lowers the calibration PPL (at most 3 times); its sets are checked against the
    one-shot sets on calibration chunks the search never saw. Prints a ranked table per criterion,
    each search step's PPL and the chosen set; with -q, exports the pruned model (the same file as
    `export --remove-blocks`).

    \b
    Examples:
      shortquant prune ./Llama-3.2-3B --remove 6 --calib calib.txt
      shortquant prune ./Llama-3.2-3B --remove 6 --calib calib.txt -q q4_k_m -q q8_0 --out ./gguf
      shortquant prune ./Llama-3.2-3B --remove 6 --calib calib.txt --criterion bi --save-hf ./pruned-hf

    With --budget SIZE and --text FILE (held-out text), the frontier: at that file size, the
    unpruned model at the highest-bit type that fits against 1..K blocks removed (the search's
    first K removals) at the highest-bit types that fit; each file is written to --out/kN/ and
    measured as `shortquant eval --base` does (KLD against the unpruned F16, PPL); prints which
    wins and writes frontier.png and frontier-results.json to --out:

    \b
      shortquant prune ./Llama-3.2-3B --budget 1.6G --calib calib.txt --text heldout.txt --remove 6
    """
    import dataclasses

    from tqdm import tqdm

    from ..export_cli import _options_from
    from ..errors import LayoutError, QuantError
    from ..evaluate.perplexity import read_text
    from ..export import make_model_plan
    from ..families.hf_model import load_torch_model
    from ..source.checkpoint import open_checkpoint
    from ..tokenizer.encode import encode_text
    from .cost import choose
    from .frontier import finish, prepare
    from ..families.block_runner import BlockRunner, stream_blocks
    from .save_hf import check_target
    from .search import check_count, default_pool, measure

    silent = quiet or as_json
    path, options = _options_from(**source, quants=tuple(quants), out_dir=out_dir, threads=threads, quiet=silent)
    if options.remove_blocks:
        raise LayoutError("prune chooses the blocks itself; to remove given blocks use `export --remove-blocks`")
    if save_hf is not None:
        check_target(save_hf)
    checkpoint = open_checkpoint(path)
    block_map = make_model_plan(checkpoint, options).block_map
    text = read_text(calib)
    calib_id = f"{calib.name} sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    frontier = prepare(path, checkpoint, options, block_map, calib, count, criterion, calib_id, budget, heldout,
                       eval_ctx, eval_chunks)
    count = frontier.count if frontier else count
    if count is None:
        raise QuantError("--remove K: say how many blocks to remove (or --budget SIZE for the frontier)")
    check_count(count, block_map.block_count)
    if threads:
        import torch

        torch.set_num_threads(threads)
    ids, bos = encode_text(path, text)
    n, streamed = block_map.block_count, stream_blocks(checkpoint)
    settings = choose(n, count, ctx, chunks, held_apart, pool, sum(t.n_elements for t in checkpoint.tensors.values()),
                      streamed, criterion == "greedy", True if criterion == "taylor" else taylor,
                      available_tokens=len(ids))
    pieces, held = calibration_chunks(ids, bos, settings.search_ctx, settings.search_chunks, settings.held_ctx,
                                      settings.held, calib)
    pool = settings.pool if settings.pool is not None else default_pool(n, count)
    if settings.reduced and not quiet:   # on stderr, so --json's stdout stays one document
        click.echo(cut_line(n, settings, pool, criterion == "greedy"), err=True)
    with tqdm(total=n, desc="reference pass", unit="block", disable=silent, leave=False) as bar:
        runner = BlockRunner(load_torch_model(path, stream_blocks=streamed), pieces, held, bar)
    scores, choices = measure(runner, count, criterion, silent, pool, taylor=settings.taylor,
                              step_checks=settings.step_checks)
    cost = {"streamed": streamed, "pool": pool if criterion == "greedy" else None, "reduced_for_cost": settings.reduced,
            "cut": list(settings.cuts), "search_tokens": settings.tokens[0], "held_apart_tokens": settings.tokens[1],
            "taylor": "taylor" in scores, "step_checks": settings.step_checks,
            "predicted_ratio_to_export": round(settings.ratio, 2), "sweeps": runner.costs}
    chosen = choices[criterion] if criterion != "greedy" else choices["chosen"]
    removed = tuple(block_map.stored[b] for b in chosen.removed)
    method = f"shortquant prune: {HOW[chosen.how]}; calibration {calib_id}"
    del runner
    gc.collect()

    saved = None
    if save_hf is not None:
        from .save_hf import save_pruned_checkpoint

        saved = save_pruned_checkpoint(path, removed, save_hf, method, options)
    report = _print_choice(block_map, scores, choices, chosen, removed, runner_info=(len(pieces), held, settings),
                           as_json=as_json, quiet=quiet, saved=saved)
    report["cost"] = cost
    if frontier:   # -q then names the types the frontier tries
        report["frontier"] = finish(frontier, path, checkpoint, options, block_map, criterion, scores, choices,
                                    calib_id, silent, table=not as_json)
    elif quants:
        from ..export_cli import _export_printer
        from ..job import run_job

        options = dataclasses.replace(options, remove_blocks=removed, pruning_method=method)
        result = run_job(path, options, on_step=None if as_json else _export_printer(path, as_json, quiet))
        report["files"] = [{"path": str(f.path), "type": f.type_label, "bytes": f.bytes} for f in result.report.files]
    if as_json:
        click.echo(json.dumps(report, indent=2))


def calibration_chunks(ids, bos, search_ctx: int, search_chunks: int, held_ctx: int, held: int, source=None):
    """The searched chunks (``search_ctx`` tokens each) from the start of the calibration tokens,
    then the held-apart ones (``held_ctx``) from where they end; with equal lengths, the same
    chunks as ``chunk_tokens(ids, ctx, search_chunks + held)``. Returns (chunks, held count)."""
    from ..errors import EvalError, QuantError
    from ..quant.imatrix import chunk_tokens

    if search_chunks < 1:
        raise QuantError(f"--held-apart {held}: {search_chunks + held} calibration chunk(s) leave none to search on")
    if len(ids) < search_ctx + held_ctx:
        raise EvalError(f"the calibration text has {len(ids)} tokens; at least 2 chunks are needed (one of {search_ctx} "
                        f"to search on, one of {held_ctx} held apart): give a longer text or a smaller --ctx", source)
    kept = min(search_chunks, max(1, (len(ids) - held_ctx) // search_ctx))
    searched = chunk_tokens(ids, ctx=search_ctx, chunks=kept, bos_id=bos)
    apart = chunk_tokens(ids[len(searched) * search_ctx:], ctx=held_ctx, chunks=held, bos_id=bos)
    return searched + apart, len(apart)


def cut_line(n: int, settings, pool: int, greedy: bool) -> str:
    """The one stderr line that says what the cost budget cut from the defaults and how to ask for more."""
    s_tokens, h_tokens = settings.tokens
    parts = [f"searching on {settings.search_chunks} chunk(s) of {settings.search_ctx} tokens, "
             f"{settings.held} of {settings.held_ctx} held apart"]
    if greedy:
        parts.append(f"greedy pool {pool}")
    if "taylor" in settings.cuts:
        parts.append("Taylor+ not scored")
    if "step checks" in settings.cuts:
        parts.append("held-apart check of the final candidates only")
    return (f"{n} blocks: to stay near {settings.ratio:.1f} plain exports' time the defaults were cut: "
            + "; ".join(parts) + " (more: --chunks N, --ctx N, --pool N, --taylor)")


def _fmt(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)


def _round(value: float, digits: int = 4):
    return None if value != value else round(value, digits)


def _print_choice(block_map, scores, choices, chosen: Choice, removed, runner_info, as_json, quiet, saved) -> dict:
    n_chunks, held, settings = runner_info
    ctx = settings.held_ctx
    original = block_map.original or block_map.stored
    report = {
        "blocks": block_map.block_count, "chunks": n_chunks, "held_apart": held, "ctx": ctx,
        "search_ctx": settings.search_ctx,
        "scores": {c: [round(v, 6) for v in scores[c]] if c in scores else None for c in CRITERIA},
        "choices": {k: {"removed": [block_map.stored[b] for b in c.removed], "held_apart_ppl": _round(c.held_ppl),
                        "steps": [{"block": block_map.stored[s.block], "search_ppl": round(s.search_ppl, 4),
                                   "held_apart_ppl": _round(s.held_ppl),
                                   **({} if s.put_back is None else {"put_back": block_map.stored[s.put_back]})}
                                  for s in c.steps]}
                    for k, c in choices.items() if k != "chosen"},
        "chosen": {"how": chosen.how, "removed": list(removed), "held_apart_ppl": _round(chosen.held_ppl)},
        "saved_hf": str(saved) if saved else None}
    if as_json or quiet:
        return report
    ranks = {c: {b: r for r, b in enumerate(sorted(range(len(s)), key=lambda b: (s[b], b)), 1)}
             for c, s in scores.items()}
    searched = n_chunks - held
    click.echo(f"calibration: {searched} chunk(s) of {settings.search_ctx} tokens searched on, {held} of {ctx} "
               f"held apart; lower score = cheaper to remove")
    click.echo("| block | BI | rank | PPL without it | rank | Taylor | rank |")
    click.echo("|---:|---:|---:|---:|---:|---:|---:|")
    for b in range(block_map.block_count):
        label = f"{block_map.stored[b]}" + (f" (orig {original[b]})" if original[b] != block_map.stored[b] else "")
        taylor = f"{scores['taylor'][b]:.4g} | {ranks['taylor'][b]}" if "taylor" in scores else "- | -"
        click.echo(f"| {label} | {scores['bi'][b]:.4f} | {ranks['bi'][b]} | {scores['ppl'][b]:.3f} | "
                   f"{ranks['ppl'][b]} | {taylor} |")
    if "taylor" not in scores:
        click.echo("(Taylor+ not scored: skipped to keep a big model's run near the cost budget; --taylor scores it)")
    greedy = choices.get("greedy")
    if greedy is not None:
        click.echo("\ngreedy steps (calibration PPL: search chunks / held-apart chunks):")
        removed_so_far = []
        for s in greedy.steps:
            removed_so_far.append(block_map.stored[s.block])
            click.echo(f"  remove {block_map.stored[s.block]:>3}  ->  {s.search_ppl:10.3f} / {_fmt(s.held_ppl, '10.3f')}   "
                       f"(removed {sorted(removed_so_far)})")
    for s in getattr(choices.get("swaps"), "steps", []):
        removed_so_far = [b for b in removed_so_far if b != block_map.stored[s.put_back]] + [block_map.stored[s.block]]
        click.echo(f"  keep {block_map.stored[s.put_back]:>3}, remove {block_map.stored[s.block]:>3}  ->  "
                   f"{s.search_ppl:10.3f} / {_fmt(s.held_ppl, '10.3f')}   (removed {sorted(removed_so_far)})")
    click.echo(f"\nheld-apart calibration PPL (full model {choices['none'].held_ppl:.3f}):")
    for k, c in choices.items():
        if k in ("chosen", "none"):
            continue
        mark = "  <- chosen" if c is chosen else ""
        click.echo(f"  {k:<7} removes {[block_map.stored[b] for b in c.removed]}: {c.held_ppl:.3f}{mark}")
    click.echo(f"\nremove blocks: {','.join(map(str, removed))}  ({HOW[chosen.how]})")
    if saved:
        click.echo(f"pruned checkpoint: {saved}")
    return report
