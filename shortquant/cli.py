"""Command line: thin click glue over the pipeline stages.

Errors from bad input are ``ShortquantError``s: printed as one line, exit code 2. Anything
else is an internal failure: one line and exit code 1 (``SHORTQUANT_DEBUG=1`` shows the
traceback).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import ShortquantError
from .export_cli import _export_printer, _options_from, _source_options


class _Group(click.Group):
    """Runs every command under one error handler."""

    def invoke(self, ctx):
        from .signals import exit_code, handle_termination, signal_name

        try:
            with handle_termination():   # SIGTERM/SIGHUP clean up like Ctrl-C
                return super().invoke(ctx)
        except ShortquantError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            click.echo(f"interrupted ({signal_name(exc)}); no partial files were left behind", err=True)
            sys.exit(exit_code(exc))
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:  # internal failure: one line unless debugging
            if os.environ.get("SHORTQUANT_DEBUG"):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"internal error: {type(exc).__name__}: {first} "
                       f"(set SHORTQUANT_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="shortquant")
def main():
    """Turn pruned Hugging Face LLaMA-family checkpoints into correct GGUF files.

    \b
    Quick start (the embedded demo model, no download):
      shortquant inspect                      # what the tool sees and will do
      shortquant export --quant q8_0          # writes ./gguf/Shortquant-Demo-...-Q8_0.gguf
    Your own checkpoint:
      shortquant export ./st-vicuna-v1.3-5.5b-taylor --quant f16 --quant q8_0 --out ./gguf
    """


@main.command()
@_source_options
@click.option("--quant", "quants", multiple=True, default=("f16",), show_default=True, metavar="TYPE",
              help="Show the tensor types for this output type (repeatable). 'all' is every type but "
                   "the ternary tq1_0/tq2_0 (only for models trained ternary); name those to see them.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def inspect(source, recipe, source_blocks, chat_template, name, quants, as_json):
    """Show what shortquant sees in SOURCE and what it will write. Reads no weights.

    SOURCE is a Hugging Face checkpoint folder; without it, the embedded demo model. Given a
    GGUF file instead, shows what that file holds: its type and size, the blocks it was pruned
    to, every tensor kind's types and, for an optimized mix (--optimize, --target-bpw), the
    optimizer's record: budget, base mix, measured KL divergences and the tensors it changed.

    \b
    Examples:
      shortquant inspect ./st-vicuna-v1.3-5.5b-taylor
      shortquant inspect ./my-sleb-model --source-blocks 0-9,11-31 --quant q4_k_m
      shortquant inspect out/st-vicuna-5.5b-Q4_K_M_OPT.gguf --json
    """
    if source is not None and str(source).lower().endswith(".gguf"):
        from .gguf_info import describe_file, file_info

        if not Path(source).is_file():
            raise click.BadParameter(f"{source}: no such file", param_hint="SOURCE")
        info = file_info(source)
        click.echo(json.dumps(info, indent=2) if as_json else describe_file(info))
        return
    from .export import make_model_plan
    from .plan import describe, plan_as_dict
    from .quant.mixes import plan_file
    from .quant.types import parse_quants
    from .source.checkpoint import open_checkpoint

    path, options = _options_from(source, recipe, source_blocks, chat_template, name, Path("."),
                                  quants=tuple(quants))
    plan = make_model_plan(open_checkpoint(path), options)
    files = [plan_file(plan, spec, options.out_dir, require_imatrix=False) for spec in parse_quants(list(quants))]
    if as_json:
        click.echo(json.dumps(plan_as_dict(plan, files), indent=2))
    else:
        click.echo(describe(plan, files))


@main.command()
@_source_options
@click.option("--quant", "-q", "quants", multiple=True, default=("f16",), show_default=True, metavar="TYPE",
              help="Output type, llama.cpp's names (f16, q8_0, q4_k_m, ...). Repeat for a ladder; "
                   "the source is read once. 'all' is every type but the ternary tq1_0/tq2_0, which only "
                   "suit models trained ternary (BitNet b1.58); name them to get them.")
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=Path), default=Path("gguf"),
              show_default=True, help="Folder for the GGUF files.")
@click.option("--imatrix", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Importance matrix (llama.cpp's GGUF or .dat format, or from `shortquant imatrix`); "
                   "needed by the IQ1/IQ2/IQ3_XXS types.")
@click.option("--output-type", metavar="TYPE", help="Type of output.weight, e.g. q8_0 (like llama-quantize).")
@click.option("--embedding-type", metavar="TYPE", help="Type of token_embd.weight.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="Type for tensors whose name matches the regex, e.g. 'ffn_down=q6_k' (repeatable).")
@click.option("--pure", is_flag=True, help="Every weight gets the type's default; no mix rules.")
@click.option("--optimize", is_flag=True,
              help="Measure the model and choose every tensor's type for the least KL divergence at no more "
                   "than each --quant's own file size (needs --calib); the file is named <TYPE>_OPT.")
@click.option("--target-bpw", metavar="BITS[,BITS...]",
              help="Also write an optimized file of at most this many bits per weight (needs --calib); "
                   "a comma list, e.g. 2.5,3,4,5, writes a ladder from one measurement.")
@click.option("--target-size", metavar="SIZE",
              help="Also write an optimized file of at most SIZE bytes, e.g. 3.2G (needs --calib).")
@click.option("--probe-from", type=click.Choice(["auto", "memory", "disk"]), default="auto",
              show_default=True,
              help="Where --optimize keeps the model it probes: memory (the float32 model, fastest on small "
                   "models) or disk (blocks read from the checkpoint one at a time: a 7B in a few GB); auto is "
                   "disk from 0.5B parameters. Both give the same numbers.")
@click.option("--optimize-keep", metavar="KIND[,KIND...]",
              help="Tensor kinds --optimize leaves at the standard mix's type (token_embd, output, attn_q, "
                   "attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down; a tied embedding is the output "
                   "too); the budget goes to the other tensors. E.g. token_embd,output: only the blocks change.")
@click.option("--calib", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Calibration text for --optimize / --target-*; never the text you evaluate on.")
@click.option("--threads", "-t", type=click.IntRange(min=1), help="Quantization threads [default: all cores].")
@click.option("--allow-nonfinite", is_flag=True, help="Export even if a weight holds NaN or Inf.")
@click.option("--eval", "evaluate", is_flag=True,
              help="Measure every file afterwards (perplexity, KLD, speed) into OUT/results.json.")
@click.option("--text", "text_path", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Evaluation text for --eval (e.g. wikitext-2 test); default: a built-in short story text.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=8), help="Context for --eval.")
@click.option("--base", metavar="PATH",
              help="KLD reference for --eval: a GGUF or HF folder [default: the f32/f16/bf16 file of this "
                   "ladder, else the source checkpoint].")
@click.option("--split-max-size", metavar="SIZE",
              help="Split files larger than SIZE (e.g. 48G, the hub's per-file limit is 50G) in llama.cpp's "
                   "split format.")
@click.option("--card", "make_card", is_flag=True,
              help="Write the model card (README.md) and ollama Modelfiles into OUT, ready for `publish`.")
@click.option("--base-model", metavar="USER/NAME",
              help="Hub id these files are made from, for general.base_model and the card "
                   "[default: from the source's README.md front matter or hub id].")
@click.option("--license", "license_id", metavar="ID",
              help="Hub license id (mit, apache-2.0, llama2, other, ...) for general.license and the card "
                   "[default: from the source's README.md front matter].")
@click.option("--force", is_flag=True, help="Write even if the free space in OUT looks too small.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def export(source, recipe, source_blocks, chat_template, name, quants, out_dir, imatrix, output_type,
           embedding_type, tensor_types, pure, threads, allow_nonfinite, evaluate, text_path, ctx, base,
           split_max_size, make_card, force, quiet, as_json, base_model=None, license_id=None, optimize=False,
           target_bpw=None, target_size=None, calib=None, probe_from="auto", optimize_keep=None):
    """Convert SOURCE into GGUF files, one per --quant.

    SOURCE is a Hugging Face checkpoint folder (safetensors or .bin, sharded or not);
    without it, the embedded demo model. Blocks are read from the tensor names, so pruned
    checkpoints with gaps or a stale num_hidden_layers convert correctly. Files are written
    under a temporary name and renamed when complete.

    \b
    Examples:
      shortquant export --quant q8_0
      shortquant export ./st-vicuna-v1.3-5.5b-taylor --quant f16 --out ./gguf
      shortquant export ./model --quant q8_0 --quant q4_k_m --recipe st-vicuna-v1.3-5.5b-taylor
      shortquant export ./model --quant all --imatrix model.imatrix.gguf
      shortquant export ./model --quant q4_k_m --tensor-type 'ffn_down=q6_k' --output-type q8_0
      shortquant export ./model -q f16 -q q8_0 -q q4_k_m --eval --text wiki.test.raw --card
      shortquant export ./model -q q4_k_m --optimize --calib calib.txt --imatrix model.imatrix.gguf
      shortquant export ./model --target-bpw 4.5 --calib calib.txt
      shortquant export ./model --target-bpw 2.5,3,3.5,4,4.5,5,6 --calib calib.txt
    """
    from .errors import PublishError
    from .job import JobSteps, run_job
    from .sizes import parse_size

    if split_max_size:
        parse_size(split_max_size, PublishError, "--split-max-size")   # a bad size fails before any work
    path, options = _options_from(source, recipe, source_blocks, chat_template, name, out_dir, quiet=quiet or as_json,
                                  quants=None if _is_default("quants") else tuple(quants), imatrix=imatrix,
                                  output_type=output_type, embedding_type=embedding_type,
                                  tensor_types=tuple(tensor_types), pure=pure, optimize=optimize,
                                  target_bpw=target_bpw, target_size=target_size, calib=calib, threads=threads,
                                  allow_nonfinite=allow_nonfinite, base_model=base_model, license=license_id,
                                  force=force, probe_from=probe_from, optimize_keep=optimize_keep)
    steps = JobSteps(split_max_size=split_max_size, evaluate=evaluate, text=text_path, ctx=ctx, base=base,
                     card=make_card)
    result = run_job(path, options, steps, on_step=_export_printer(path, as_json, quiet))
    if result.report.failed:
        sys.exit(2)


def _is_default(param: str) -> bool:
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(param) == ParameterSource.DEFAULT


@main.command()
def recipes():
    """List the known pruned releases (use with --recipe)."""
    from .recipes import list_recipes

    for r in list_recipes():
        removed = ",".join(map(str, r.removed_blocks))
        click.echo(f"{r.name:<32} {r.hub_id or '-':<40} removed blocks {removed}")


# Commands of the later stages live beside their code; they register here.
def _register_stage_commands() -> None:
    from .evaluate.commands import bench_command, eval_command, report_command
    from .publish.commands import card_command, publish_command, split_command
    from .publish.verify import verify_command
    from .quant.commands import imatrix_command

    for command in (imatrix_command, eval_command, bench_command, report_command, card_command, split_command,
                    publish_command, verify_command):
        main.add_command(command)
    from .batch.commands import batch_command
    from .prune.commands import prune_command

    main.add_command(batch_command)
    main.add_command(_source_options(prune_command))   # prune reads its source as export does


_register_stage_commands()
