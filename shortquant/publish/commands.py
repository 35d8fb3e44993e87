"""Click commands ``card``, ``split`` and ``publish`` (registered by shortquant/cli.py).

They parse options and call :mod:`card` / :mod:`modelfile`, :mod:`split` and :mod:`upload`.
Bad input raises ShortquantError subclasses; the CLI prints those as one line and exits 2.
"""

from __future__ import annotations

import json

import click


@click.command("card")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--recipe", metavar="NAME",
              help="Known release (name or hub id) for base model, license and pruning details "
                   "(default: the recipe recorded in the files).")
@click.option("--results", "results_path", type=click.Path(dir_okay=False),
              help="results.json from `shortquant eval` (default: OUTDIR/results.json if present).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Image to show on the card (copied into OUTDIR).")
@click.option("--quantized-by", default="shortquant", show_default=True, metavar="NAME",
              help="Who made the quantizations (hub user or organisation).")
@click.option("--repo", metavar="USER/NAME", help="Hub repo the card is for, used in the run examples.")
@click.option("--no-modelfile", is_flag=True, help="Do not write ollama Modelfiles and root files.")
@click.option("--base-model", metavar="USER/NAME",
              help="Hub id of the model the files were made from (default: the recipe's, or the files').")
@click.option("--license", "license_id", metavar="ID",
              help="Hub license id, e.g. mit (default: the recipe's, or the files' general.license).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the written paths as JSON.")
def card_command(outdir, recipe, results_path, plot, quantized_by, repo, no_modelfile, base_model, license_id,
                 quiet, as_json):
    """Write README.md (model card) and ollama Modelfiles for the GGUF files in OUTDIR.

    \b
    Example:
      shortquant card ./gguf --recipe st-vicuna-v1.3-5.5b-taylor --repo me/st-vicuna-5.5b-GGUF
    """
    from shortquant.publish.card import card_warnings, write_card
    from shortquant.publish.modelfile import write_modelfiles

    readme = write_card(outdir, recipe=recipe, results=results_path, quantized_by=quantized_by,
                        plot=plot, repo=repo, progress=not quiet, base_model=base_model, license=license_id)
    for warning in card_warnings(readme):
        click.echo(f"warning: {warning}", err=True)
    written = [readme] + ([] if no_modelfile else write_modelfiles(outdir))
    if as_json:
        click.echo(json.dumps({"written": [str(p) for p in written]}, indent=2))
    else:
        for path in written:
            click.echo(f"wrote {path}")


@click.command("split")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--split-max-size", default="48G", show_default=True, metavar="SIZE",
              help="Most tensor data per part, in decimal units (K, M, G), as llama-gguf-split.")
@click.option("--out-dir", type=click.Path(file_okay=False), help="Where to write the parts (default: next to FILE).")
@click.option("--remove-original", is_flag=True, help="Delete FILE once all parts are written.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the part paths as JSON.")
def split_command(file, split_max_size, out_dir, remove_original, quiet, as_json):
    """Split a GGUF FILE into llama.cpp's split format (-00001-of-0000N.gguf).

    llama.cpp and llama-cpp-python load the parts when given the first one; ollama cannot.

    \b
    Example:
      shortquant split ./gguf/St-Vicuna-v1.3-10.5B-Taylor-F16.gguf --split-max-size 48G
    """
    from pathlib import Path

    from shortquant.publish.split import split_gguf

    parts = split_gguf(file, split_max_size, outdir=out_dir, progress=not quiet)
    was_split = parts != [Path(file)]
    if was_split and remove_original:
        Path(file).unlink()
    if as_json:
        click.echo(json.dumps({"split": was_split, "parts": [str(p) for p in parts]}, indent=2))
    elif not was_split:
        click.echo(f"{file} fits in one part of {split_max_size}; nothing to split")
    else:
        for path in parts:
            click.echo(f"wrote {path}")


@click.command("publish")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--repo", required=True, metavar="USER/NAME", help="Hub model repo (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--dry-run", is_flag=True,
              help="No network: stage exactly what would be uploaded, with a manifest.")
@click.option("--staging-dir", type=click.Path(file_okay=False),
              help="Where --dry-run stages the files (default: OUTDIR.staging).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def publish_command(outdir, repo, private, dry_run, staging_dir, quiet, as_json):
    """Upload OUTDIR (GGUF files, README.md, Modelfiles, results) to a Hugging Face repo.

    The token comes from HF_TOKEN or `hf auth login`. Transient hub errors are retried, and
    running it again after an interruption skips what is already uploaded.

    \b
    Examples:
      shortquant publish ./gguf --repo me/st-vicuna-5.5b-GGUF --dry-run
      HF_TOKEN=... shortquant publish ./gguf --repo me/st-vicuna-5.5b-GGUF --private
    """
    from shortquant.sizes import format_size
    from shortquant.publish.upload import publish

    result = publish(outdir, repo, private=private, dry_run=dry_run, staging_dir=staging_dir,
                     progress=not quiet, on_warning=lambda text: click.echo(f"warning: {text}", err=True))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    total = format_size(sum(f.size for f in result.files))
    if result.dry_run:
        click.echo(f"dry run: {len(result.files)} files ({total}) staged in {result.staging_dir}; "
                   f"manifest: {result.staging_dir / 'manifest.json'}")
    else:
        click.echo(f"uploaded {len(result.files)} files ({total}) to {result.url}")
