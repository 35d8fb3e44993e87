"""The click side of exporting, shared by the commands that export (``inspect``, ``export``,
``prune``): the options that say how to read a source, the adapter onto export's one options
builder (:func:`shortquant.export.options_from`) and the printer of each step.

Below the CLI module, so a command package (``prune``) reads its source and prints its export as
``export`` does without importing the CLI that registers it.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def _source_options(f):
    """Options shared by inspect and export: how to read the source."""
    options = [
        click.argument("source", required=False),
        click.option("--recipe", metavar="NAME",
                     help="Known release to take provenance, license and chat template from "
                          "(see `shortquant recipes`)."),
        click.option("--source-blocks", metavar="LIST",
                     help="Original block index of each stored block, e.g. '0-23,30,31' "
                          "(recorded in the GGUF as provenance)."),
        click.option("--remove-blocks", metavar="LIST", expose_value=False, callback=_remember("remove_blocks"),
                     help="Leave out these blocks (the indices in the checkpoint's tensor names), e.g. '12-14,25': "
                          "the same file as exporting the checkpoint saved without them, with the original "
                          "index of every kept block recorded. `shortquant prune` chooses them by measurement."),
        click.option("--chat-template", metavar="NAME",
                     help="Built-in chat template when the checkpoint has none (vicuna, llama-2, none)."),
        click.option("--name", metavar="TEXT", help="Model name to use instead of the folder name."),
        click.option("--pre", metavar="NAME", expose_value=False, callback=_remember("pre"),
                     help="llama.cpp's BPE pre-tokenizer name (llama-bpe, qwen2, smollm, ...) when the "
                          "tokenizer.json's own is not in llama.cpp's table; normally detected."),
        click.option("--pad-ffn", type=click.IntRange(min=0), default=None, metavar="N",
                     expose_value=False, callback=_remember("pad_ffn"),
                     help="Zero-pad FFN widths to a multiple of N (exact; K-quants then apply to ffn_down "
                          "instead of falling back). Default: widths pruning changed, to 256. 0: never."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _remember(key):
    """A click callback keeping an option's value in the context, for ``_options_from``."""
    def callback(ctx, _param, value):
        ctx.meta[f"shortquant.{key}"] = value
        return value
    return callback


def _options_from(source, recipe, source_blocks, chat_template, name, out_dir, quiet=False, **settings):
    """``export``'s one builder of ExportOptions (shortquant.export.options_from), fed the options
    of this command; --pre, --pad-ffn and --remove-blocks come through the context."""
    from .export import options_from

    meta = click.get_current_context().meta
    return options_from(source, out_dir, quiet=quiet, note=lambda text: click.echo(f"note: {text}", err=True),
                        recipe=recipe, source_blocks=source_blocks, chat_template=chat_template, name=name,
                        pre=meta.get("shortquant.pre"), pad_ffn=meta.get("shortquant.pad_ffn"),
                        remove_blocks=meta.get("shortquant.remove_blocks"), **settings)


def _export_printer(source: Path, as_json: bool, quiet: bool):
    """Prints each step of `export` as soon as it is done (see shortquant.job.run_job)."""
    from .evaluate.results import markdown_table

    silent = quiet or as_json

    def show(step: str, result) -> None:
        report = result.report
        if step == "exported":
            for stale in report.removed_stale:
                click.echo(f"note: removed {stale}, left behind by an interrupted run", err=True)
            for warning in report.plan.warnings:
                click.echo(f"warning: {warning}", err=True)
            for quant, reason in report.skipped.items():
                click.echo(f"note: skipped {quant}: {reason}", err=True)
            for outcome in report.optimized:
                for note in outcome.notes:
                    click.echo(f"note: {note}", err=True)
            for first, parts in (result.splits.items() if not silent else ()):
                click.echo(f"split into {len(parts)} parts: {first.name} ...")
            _print_export(report, source, as_json, quiet)
            for quant, reason in report.failed.items():
                click.echo(f"error: {quant} failed: {reason}", err=True)
        elif step == "evaluated" and not silent:
            click.echo(markdown_table(result.results))
        elif step == "card":
            from .publish.card import card_warnings

            for warning in card_warnings(result.card):
                click.echo(f"warning: {warning}", err=True)
            if not silent:
                click.echo(f"card: {result.card} (+{len(result.card_files) - 1} ollama files)")
    return show


def _print_export(report, source: Path, as_json: bool, quiet: bool) -> None:
    if as_json:
        click.echo(json.dumps({
            "source": str(source), "seconds": round(report.seconds, 3),
            "files": [{"path": str(f.path), "type": f.type_label, "bytes": f.bytes, "n_params": f.n_params,
                       "bpw": round(f.bpw, 4)} for f in report.files],
            "failed": report.failed, "skipped": report.skipped,
            "optimized": [o.as_dict() for o in report.optimized]}, indent=2))
    elif not quiet:
        from .sizes import format_size

        for f in report.files:
            click.echo(f"{f.path}  {f.type_label:<8} {format_size(f.bytes):>10}  {f.bpw:5.2f} bpw")
        click.echo(f"done in {report.seconds:.1f} s")
