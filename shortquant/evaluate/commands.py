"""Click commands ``eval``, ``bench`` and ``report`` (registered by shortquant/cli.py).

They parse options, call :mod:`shortquant.evaluate.runner` / :mod:`report`, and print a
Markdown table (or JSON with ``--json``). Bad input raises ShortquantError subclasses; the
CLI prints those as one line and exits 2.
"""

from __future__ import annotations

import json

import click

from shortquant.evaluate.results import markdown_table, read_results


def _emit(data: dict, as_json: bool, output) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(markdown_table(data))
    if output:
        click.echo(f"\nresults written to {output}", err=True)


@click.command("eval")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--text", "text_path", type=click.Path(dir_okay=False),
              help="Evaluation text (default: the built-in demo text; use wikitext-2's "
                   "wiki.test.raw for real models).")
@click.option("--ctx", default=512, show_default=True, help="Context size of each chunk.")
@click.option("--base", type=click.Path(),
              help="Base for KL divergence: a GGUF (e.g. the F16/F32 export), a Hugging Face "
                   "model folder, or a cached base-logits folder.")
@click.option("--chunks", "n_chunks", type=int, help="Evaluate only the first N chunks.")
@click.option("--threads", type=int, help="CPU threads (default: all cores).")
@click.option("--batch", "n_batch", default=2048, show_default=True,
              help="Batch size as llama-perplexity's -b (several chunks share a batch).")
@click.option("--bench", is_flag=True, help="Also measure pp/tg speed of each file.")
@click.option("--gpu-layers", default=0, show_default=True,
              help="Layers to offload to the GPU (needs a GPU build of llama-cpp-python).")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where base log-probs are cached (default ~/.cache/shortquant/base-logprobs).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write results.json here.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def eval_command(files, text_path, ctx, base, n_chunks, threads, n_batch, bench, gpu_layers,
                 cache_dir, output, quiet, as_json):
    """Perplexity (llama-perplexity's algorithm) and KL divergence of GGUF FILES.

    \b
    Example:
      shortquant eval out/*.gguf --text wiki.test.raw --ctx 512 \\
          --base out/Model-F16.gguf -o results.json

    Without --text the built-in demo text is used (it fits the demo model). For real
    models use wikitext-2's test split, the community's convention:

    \b
      wget https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip
      unzip wikitext-2-raw-v1.zip      # then: --text wikitext-2-raw/wiki.test.raw
    """
    from shortquant.evaluate.runner import evaluate_files

    data = evaluate_files(files, text_path, ctx, base, n_chunks=n_chunks, threads=threads,
                          bench=bench, gpu_layers=gpu_layers, n_batch=n_batch, cache_dir=cache_dir,
                          quiet=quiet, output=output)
    _emit(data, as_json, output)


@click.command("bench")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--gpu-layers", default=0, show_default=True,
              help="Layers to offload to the GPU (needs a GPU build of llama-cpp-python).")
@click.option("--threads", type=int, help="CPU threads (default: all cores).")
@click.option("--pp", "n_prompt", default=512, show_default=True, help="Prompt tokens (ppN test).")
@click.option("--tg", "n_gen", default=128, show_default=True, help="Generated tokens (tgN test).")
@click.option("--reps", default=5, show_default=True, help="Timed repetitions after a warm-up.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write results.json here.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_command(files, gpu_layers, threads, n_prompt, n_gen, reps, output, quiet, as_json):
    """Prompt-processing and generation speed of GGUF FILES, like llama-bench.

    \b
    Example:
      shortquant bench out/Model-Q4_K_M.gguf --threads 8
      shortquant bench out/Model-Q4_K_M.gguf --gpu-layers 99 -o speed.json
    """
    from shortquant.evaluate.runner import bench_files

    data = bench_files(files, n_prompt=n_prompt, n_gen=n_gen, reps=reps, threads=threads,
                       gpu_layers=gpu_layers, quiet=quiet, output=output)
    _emit(data, as_json, output)


@click.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", default="report.png", show_default=True,
              type=click.Path(dir_okay=False), help="Image to write (.png, .svg, .pdf).")
@click.option("--unpruned", type=click.Path(dir_okay=False),
              help="results.json of the unpruned model, drawn as its own series.")
@click.option("--x", "x_axis", type=click.Choice(["bpw", "size"]), default="bpw", show_default=True,
              help="Horizontal axis: bits per weight or file size.")
@click.option("--title", help="Plot title.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def report_command(results, output, unpruned, x_axis, title, quiet):
    """Plot size vs KLD (log axis) and vs perplexity from results.json files.

    Every point is labelled (labels never overlap), the Pareto front is coloured and dominated
    types are grey; perplexities over 1.2x the best are pinned to the top with their value.

    \b
    Example:
      shortquant report results.json --unpruned base-results.json -o report.png
    """
    from shortquant.evaluate.report import plot_report

    data = [read_results(path) for path in results]
    path = plot_report(data, output, unpruned=read_results(unpruned) if unpruned else None,
                       x_axis=x_axis, title=title)
    if not quiet:
        for item in data:
            click.echo(markdown_table(item))
        click.echo(f"\nplot written to {path}", err=True)
