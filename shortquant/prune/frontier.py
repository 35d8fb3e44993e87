"""``prune --budget SIZE``: at one file size, is it better to remove blocks and keep more bits?

For one budget, the unpruned model at the highest-bit type whose file fits is set against the
model with k = 1..K blocks removed, each at the highest-bit type that fits. The k-block sets are
the first k blocks of the search's removal order (greedy's steps are nested, so one search gives
every k; a one-shot criterion's k cheapest blocks are nested too). Every candidate's size is the
writer's own plan (``GGUFFileWriter.planned_size``: exact, known before a byte is written), so
"fits" and "the next type up would not" are decided on planned bytes. The chosen files are
written by the export job (`prune -q`'s path), then measured on held-out text by `shortquant
eval`'s code (:func:`shortquant.evaluate.runner.evaluate_files`): KL divergence against the
unpruned F16 and perplexity. The lowest mean KLD wins.

The held-out text must not be the calibration text: the search chose the blocks on it.

>>> pick({"q8_0": 900, "q6_k": 700, "q4_k_m": 500}, 800)
'q6_k'
>>> next_up({"q8_0": 900, "q6_k": 700, "q4_k_m": 500}, "q6_k")
'q8_0'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import click

from ..errors import EvalError, QuantError
from ..sizes import format_size, parse_size

# The types people publish, highest-bit first: the ladder each candidate climbs when no -q is given
# (legacy and IQ types are alternatives at similar sizes; `-q all` tries every one).
LADDER = ("f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")
REFERENCE = "f16"      # the unpruned file every KLD is measured against
DEFAULT_SHARE = 4      # without --remove: up to a quarter of the blocks


def frontier_options(command):
    """The frontier's options of ``prune`` (kept here so the command only passes them on)."""
    options = [
        click.option("--budget", metavar="SIZE",
                     help="Frontier: at this file size (decimal units, e.g. 1.6G, 700M) compare the unpruned model "
                          "at the highest-bit type that fits with 1..K blocks removed, each at the highest-bit "
                          "type that fits; writes those files, measures KLD against the unpruned F16 and PPL on "
                          "--text, prints which wins and plots it. K is --remove [default: a quarter of the "
                          "blocks]; -q limits the types tried [default: f16, q8_0, q6_k, q5_k_m/s, q4_k_m/s, "
                          "q3_k_l/m/s, q2_k; `-q all` for every type]."),
        click.option("--text", "heldout", type=click.Path(path_type=Path, dir_okay=False, exists=True),
                     help="Held-out text the frontier measures on (never the --calib text)."),
        click.option("--eval-ctx", type=click.IntRange(min=4), default=512, show_default=True,
                     help="Frontier: context of each held-out chunk (as `shortquant eval --ctx`)."),
        click.option("--eval-chunks", type=click.IntRange(min=1), default=None, metavar="N",
                     help="Frontier: measure only the first N held-out chunks [default: all]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@dataclass(frozen=True)
class Setup:
    """What the frontier knows before the search: checked inputs and the types to climb."""

    budget: int
    budget_text: str
    heldout: Path
    count: int
    ladder: tuple[str, ...]
    eval_ctx: int
    eval_chunks: int | None


@dataclass
class Row:
    """One candidate: k blocks removed, the planned size of every type, the type chosen."""

    k: int
    removed: tuple[int, ...]        # stored block indices
    sizes: dict[str, int]           # type -> planned bytes
    quant: str | None               # the highest-bit type that fits (None: none does)
    method: str | None = None       # how the blocks were chosen, as the file records it
    path: Path | None = None
    result: dict | None = None      # the file's entry in the evaluation's results

    @property
    def label(self) -> str:
        return self.quant.upper() if self.quant else "-"


def pick(sizes: dict[str, int], budget: int) -> str | None:
    """The type with the largest planned file within ``budget`` (ties: the first given)."""
    fits = [q for q in sizes if sizes[q] <= budget]
    return max(fits, key=lambda q: sizes[q]) if fits else None


def next_up(sizes: dict[str, int], quant: str) -> str | None:
    """The type with the next larger planned file than ``quant``'s (None: it is the largest)."""
    larger = [q for q in sizes if sizes[q] > sizes[quant]]
    return min(larger, key=lambda q: sizes[q]) if larger else None


def default_count(n_blocks: int) -> int:
    return max(1, n_blocks // DEFAULT_SHARE)


def planned_sizes(checkpoint, options) -> dict[str, int]:
    """The exact file size of every type in ``options.quants``, as export plans and checks it
    (types `all` cannot make without an imatrix are left out, as export leaves them out)."""
    from ..export import make_model_plan, plan_files, source_metadata
    from ..gguf_out import GGUFFileWriter

    plan = make_model_plan(checkpoint, options)
    files, _ = plan_files(plan, options)
    extra = source_metadata(checkpoint, plan, options)
    return {f.quant: GGUFFileWriter(plan, f, extra).planned_size() for f in files}


def prepare(path: Path, checkpoint, options, block_map, calib: Path, count: int | None, criterion: str, calib_id: str,
            budget: str | None, heldout: Path | None, eval_ctx: int, eval_chunks: int | None) -> Setup | None:
    """Check the frontier's inputs before any measuring (None: no --budget, no frontier).

    Refuses --budget without --text, --text without --budget, a held-out text that is the
    calibration text, one too short for --eval-ctx, and a budget that even the smallest type of
    the most-pruned model cannot meet.
    """
    import numpy as np

    from ..evaluate.perplexity import read_text, split_chunks
    from ..tokenizer.encode import encode_text
    from .search import check_count

    if budget is None:
        if heldout is not None:
            raise EvalError("--text is the frontier's held-out text: use it with --budget SIZE")
        return None
    size = parse_size(budget, QuantError, "--budget")
    if heldout is None:
        raise EvalError(f"--budget {budget} needs held-out text to measure on: --text FILE (not the --calib text)")
    text = read_text(heldout)
    if text == read_text(calib):
        raise EvalError("has the same content as --calib: the frontier never measures on the text the blocks "
                        "were chosen on; give held-out text", heldout)
    split_chunks(np.asarray(encode_text(path, text)[0]), eval_ctx, eval_chunks, heldout)   # long enough?
    count = count if count is not None else default_count(block_map.block_count)
    check_count(count, block_map.block_count)
    setup = Setup(size, budget, heldout, count, tuple(options.quants) or LADDER, eval_ctx, eval_chunks)
    # the smallest file possible: the smallest type with the K largest blocks removed
    largest = _largest_blocks(checkpoint, options, block_map, count)
    sizes = planned_sizes(checkpoint, _options(options, setup, count, largest, method(count, criterion, calib_id)))
    smallest = min(sizes, key=lambda q: sizes[q])
    if sizes[smallest] > size:
        raise QuantError(f"--budget {budget}: no option fits; the smallest is {smallest.upper()} with {count} "
                         f"blocks removed, {format_size(sizes[smallest])} ({sizes[smallest]:,} bytes)")
    return setup


def _largest_blocks(checkpoint, options, block_map, count: int) -> tuple[int, ...]:
    """The ``count`` stored blocks with the most weights (any ``count`` of uniform blocks)."""
    from ..export import make_model_plan

    plan = make_model_plan(checkpoint, options)
    weights = [0] * block_map.block_count
    for t in plan.tensors:
        if t.name.startswith("blk."):
            weights[int(t.name.split(".")[1])] += t.n_elements
    order = sorted(range(block_map.block_count), key=lambda b: (-weights[b], b))
    return tuple(sorted(block_map.stored[b] for b in order[:count]))


def _options(options, setup: Setup, k: int, removed: tuple[int, ...], method: str):
    """The export options of the candidate with ``removed`` blocks (its own folder: files of two
    candidates may share a name)."""
    return dataclasses.replace(options, quants=setup.ladder, remove_blocks=removed or None,
                               pruning_method=method if removed else None, out_dir=Path(options.out_dir) / f"k{k}")


def removal_sets(criterion: str, scores: dict, choices: dict, count: int) -> list[tuple[int, ...]]:
    """The runner's block sets for k = 0..count: greedy's first k steps, or a one-shot
    criterion's k cheapest blocks (as `prune --criterion C --remove k` would remove)."""
    from .search import one_shot

    if criterion == "greedy":
        order = [s.block for s in choices["greedy"].steps]
        return [tuple(sorted(order[:k])) for k in range(count + 1)]
    return [()] + [one_shot(criterion, scores[criterion], k) for k in range(1, count + 1)]


def method(k: int, criterion: str, calib_id: str) -> str:
    """The pruning method a candidate's GGUF records (``shortquant.pruning.method``)."""
    how = "the greedy search's first" if criterion == "greedy" else f"the {criterion} criterion's"
    return f"shortquant prune --budget: {how} {k} blocks to remove; calibration {calib_id}"


def finish(setup: Setup, path: Path, checkpoint, options, block_map, criterion: str, scores: dict, choices: dict,
           calib_id: str, silent: bool, table: bool) -> dict:
    """Plan every candidate, write the chosen files (and the unpruned F16), measure them on the
    held-out text, plot them; print the table when ``table`` and return it as JSON-ready data."""
    rows, results, reference = run_frontier(setup, path, checkpoint, options, block_map,
                                            removal_sets(criterion, scores, choices, setup.count),
                                            criterion, calib_id, silent)
    out = Path(options.out_dir)
    best = winner(rows)
    plot_path = plot(rows, out / "frontier.png",
                     f"{block_map.block_count}-block model at {format_size(setup.budget)}: lowest KLD "
                     f"{'unpruned' if best.k == 0 else f'with {best.k} blocks removed'} ({best.label})")
    if table:
        print_table(rows, setup, reference)
        click.echo(f"plot: {plot_path}\nresults: {out / 'frontier-results.json'}", err=True)
    return as_dict(rows, results, setup, reference, out / "frontier-results.json", plot_path)


def run_frontier(setup: Setup, path: Path, checkpoint, options, block_map, sets: Sequence[tuple[int, ...]],
                 criterion: str, calib_id: str, silent: bool) -> tuple[list[Row], dict, dict]:
    """The rows (every candidate's planned sizes and chosen type, its file and measurements), the
    evaluation's results (results.json's dict) and the unpruned F16's entry in them."""
    from tqdm import tqdm

    from ..evaluate.runner import evaluate_files
    from ..job import run_job

    rows, row_options = [], []
    for k, chosen in enumerate(tqdm(sets, desc="planning sizes", unit="candidate", disable=silent, leave=False)):
        removed = tuple(sorted(block_map.stored[b] for b in chosen))
        opts = _options(options, setup, k, removed, method(k, criterion, calib_id))
        sizes = planned_sizes(checkpoint, opts)
        rows.append(Row(k, removed, sizes, pick(sizes, setup.budget), opts.pruning_method))
        row_options.append(opts)
    if not any(r.quant for r in rows):   # per-block shapes: the sets chosen may be larger than the check's
        k, q = min(((r.k, q) for r in rows for q in r.sizes), key=lambda kq: rows[kq[0]].sizes[kq[1]])
        raise QuantError(f"--budget {setup.budget_text}: no option fits; the smallest is {q.upper()} with {k} "
                         f"blocks removed, {format_size(rows[k].sizes[q])} ({rows[k].sizes[q]:,} bytes)")
    reference = None
    for row, opts in zip(rows, row_options):
        quants = tuple(dict.fromkeys([REFERENCE] * (row.k == 0) + [row.quant] * (row.quant is not None)))
        if not quants:
            continue
        job = run_job(path, dataclasses.replace(opts, quants=quants, quiet=silent))
        written = {f.quant: f.path for f in job.report.files}
        row.path = written.get(row.quant)
        reference = written.get(REFERENCE, reference)
    paths = list(dict.fromkeys([reference, *(r.path for r in rows if r.path)]))
    results = evaluate_files(paths, setup.heldout, setup.eval_ctx, reference, n_chunks=setup.eval_chunks,
                             threads=options.threads, quiet=silent,
                             output=Path(options.out_dir) / "frontier-results.json")
    entries = {Path(f["path"]): f for f in results["files"]}
    for row in rows:
        if row.path:
            row.result = entries[row.path.resolve()]
    return rows, results, entries[reference.resolve()]


def winner(rows: Sequence[Row]) -> Row:
    """The candidate with the lowest mean KLD (ties: fewer blocks removed)."""
    return min((r for r in rows if r.result), key=lambda r: (r.result["kld"]["mean"], r.k))


def plot(rows: Sequence[Row], output: Path, title: str) -> Path:
    """`shortquant report`'s plot of the candidates (size vs KLD and vs PPL), k in each label."""
    from ..evaluate.report import plot_report

    def files(chosen):
        return {"files": [dict(r.result, type=f"k={r.k} {r.label}") for r in chosen], "settings": {}}

    unpruned = [r for r in rows if r.result and r.k == 0]
    pruned = [r for r in rows if r.result and r.k > 0]
    return plot_report([files(pruned)], output, unpruned=files(unpruned) if unpruned else None, x_axis="size",
                       title=title)


def as_dict(rows: Sequence[Row], results: dict, setup: Setup, reference: dict, results_path: Path,
            plot_path: Path) -> dict:
    """The frontier as JSON-ready data: file paths and figures."""
    def row(r: Row) -> dict:
        res = r.result or {}
        kld = res.get("kld") or {}
        up = next_up(r.sizes, r.quant) if r.quant else None
        return {"k": r.k, "removed": list(r.removed), "method": r.method, "type": r.quant and r.label,
                "path": str(r.path) if r.path else None, "bytes": res.get("bytes"),
                "planned_bytes": r.sizes[r.quant] if r.quant else None,
                "next_type_up": {"type": up.upper(), "planned_bytes": r.sizes[up]} if up else None,
                "planned_sizes": {q.upper(): n for q, n in r.sizes.items()}, "bpw": res.get("bpw"),
                "kld": kld.get("mean"), "kld_err": kld.get("err"), "same_top1": kld.get("same_top1"),
                "ppl": res.get("ppl"), "ppl_err": res.get("ppl_err")}

    return {"budget": setup.budget, "heldout": str(setup.heldout), "eval_ctx": setup.eval_ctx,
            "eval_chunks": results["settings"]["chunks"], "types_tried": list(setup.ladder),
            "reference": {"path": reference["path"], "type": reference["type"], "bytes": reference["bytes"],
                          "kld": reference["kld"]["mean"], "ppl": reference["ppl"]},
            "rows": [row(r) for r in rows], "winner": winner(rows).k,
            "results": str(results_path), "plot": str(plot_path)}


def print_table(rows: Sequence[Row], setup: Setup, reference: dict) -> None:
    best = winner(rows)
    click.echo(f"\nfrontier at {format_size(setup.budget)} ({setup.budget:,} bytes); held-out text "
               f"{setup.heldout.name}, KLD against the unpruned {reference['type']}:")
    click.echo("| k | removed blocks | type | size | bpw | KLD | PPL |")
    click.echo("|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        removed = ",".join(map(str, r.removed)) or "-"
        if not r.result:
            smallest = min(r.sizes, key=lambda q: r.sizes[q])
            click.echo(f"| {r.k} | {removed} | none fits (smallest: {smallest.upper()}, "
                       f"{format_size(r.sizes[smallest])}) | | | | |")
            continue
        res, mark = r.result, " **<- wins**" if r is best else ""
        click.echo(f"| {r.k} | {removed} | {r.label} | {format_size(res['bytes'])} | {res['bpw']:.2f} | "
                   f"{res['kld']['mean']:.5f} ± {res['kld']['err']:.5f} | {res['ppl']:.3f} ± {res['ppl_err']:.3f} |"
                   f"{mark}")
    click.echo(f"reference: unpruned {reference['type']}, {format_size(reference['bytes'])}, PPL "
               f"{reference['ppl']:.3f} (its KLD against itself: {reference['kld']['mean']:.2g})")
    verdict = "keeping every block" if best.k == 0 else f"removing {best.k} block(s) ({','.join(map(str, best.removed))})"
    click.echo(f"wins at {format_size(setup.budget)}: {verdict} at {best.label}, mean KLD "
               f"{best.result['kld']['mean']:.5f}")
