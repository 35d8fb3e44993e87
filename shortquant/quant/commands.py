"""Click commands of the quantization stage (registered in shortquant/cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import ShortquantError, SourceError


@click.command("imatrix")
@click.argument("model_dir", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration text (UTF-8).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the imatrix (GGUF). Default: MODEL/imatrix.gguf for a folder, "
                   "MODEL's name with .imatrix.gguf beside a GGUF file.")
@click.option("--ctx", default=512, show_default=True, help="Tokens per chunk (llama-imatrix's -c).")
@click.option("--chunks", type=int, default=None, help="Use at most this many chunks (default: all).")
@click.option("--threads", type=int, default=None,
              help="CPU threads (default: torch's choice for a folder, all cores for a GGUF).")
@click.option("--quiet", is_flag=True, help="No progress bar, no summary line.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def imatrix_command(model_dir: Path, text_file: Path, output: Path | None, ctx: int, chunks: int | None,
                    threads: int | None, quiet: bool, as_json: bool) -> None:
    """Compute an importance matrix from a GGUF file (llama.cpp) or a Hugging Face folder (torch).

    Runs the calibration text through MODEL in chunks of --ctx tokens (each starting with
    BOS) and records, for every linear layer of every block, the sum of squared inputs per
    column and the token count: llama-imatrix's statistics, written in its GGUF format, so
    `shortquant export --imatrix` and llama-quantize both accept the file.

    \b
    Which to use:
      MODEL.gguf   llama.cpp's own forward pass (as llama-imatrix, through its evaluation
                   callback): the faster and leaner choice whenever llama.cpp loads the model.
                   Use the F16 (or BF16/F32) export of the same checkpoint: the entries carry
                   the GGUF's tensor names, which are the names every quantized export has.
      MODEL/       a Hugging Face folder, run with torch in float32 (4 bytes per weight), built
                   from the blocks export finds (gaps, stale configs, per-block shapes) and
                   tokenized as the export's llama.cpp tokenizes: for checkpoints llama.cpp
                   cannot load, or before any GGUF exists.

    \b
    Examples:
      shortquant export ./Shortened-LLaMA-5.5B --quant f16 --out gguf/
      shortquant imatrix gguf/Shortened-LLaMA-5.5B-F16.gguf --text calibration.txt \\
          -o shortened.imatrix.gguf --ctx 512 --chunks 100
      shortquant imatrix ./Shortened-LLaMA-5.5B --text calibration.txt -o shortened.imatrix.gguf
    """
    if model_dir.is_file():
        _imatrix_from_gguf(model_dir, text_file, output, ctx, chunks, threads, quiet, as_json)
        return
    import torch

    from ..families.hf_model import load_torch_model
    from ..tokenizer.encode import encode_text
    from .imatrix import compute_imatrix

    if not model_dir.is_dir():
        raise SourceError("not a model folder", model_dir)
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read calibration text: {exc}", text_file) from exc
    output = output or model_dir / "imatrix.gguf"
    if threads:
        torch.set_num_threads(threads)

    tokens, bos_id = encode_text(model_dir, text)
    model = load_torch_model(model_dir)   # float32: llama.cpp's activations are float32 too
    result = compute_imatrix(model, tokens, ctx=ctx, chunks=chunks, bos_id=bos_id,
                             dataset=text_file.name, progress=not (quiet or as_json))
    _write_and_report(output, result, ctx, len(tokens), quiet, as_json)


def _write_and_report(output: Path, result, ctx: int, n_tokens: int, quiet: bool, as_json: bool) -> None:
    """Write the imatrix and say what was written (both paths end the same way)."""
    from .imatrix import write_imatrix

    write_imatrix(output, result)
    summary = {"output": str(output), "entries": len(result.sums), "chunks": result.chunk_count,
               "ctx": ctx, "tokens": n_tokens}
    if as_json:
        click.echo(json.dumps(summary))
    elif not quiet:
        click.echo(f"wrote {summary['entries']} entries from {summary['chunks']} chunks of {ctx} tokens "
                   f"to {output}")


def _imatrix_from_gguf(path: Path, text_file: Path, output: Path | None, ctx: int, chunks: int | None,
                       threads: int | None, quiet: bool, as_json: bool) -> None:
    """``imatrix`` on a GGUF file: llama.cpp evaluates it and tokenizes with its own vocabulary."""
    from ..evaluate.llama_backend import check_gguf
    from .imatrix_llama import compute_imatrix_gguf, gguf_tokens

    try:
        check_gguf(path)
    except ShortquantError as exc:  # EvalError; here a bad MODEL is a bad source
        raise SourceError(str(exc).removeprefix(f"{path}: "), path) from exc
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read calibration text: {exc}", text_file) from exc
    output = output or path.with_name(path.name.removesuffix(".gguf") + ".imatrix.gguf")
    tokens = gguf_tokens(path, text)
    result = compute_imatrix_gguf(path, tokens, ctx=ctx, chunks=chunks, threads=threads,
                                  dataset=text_file.name, progress=not (quiet or as_json))
    _write_and_report(output, result, ctx, len(tokens), quiet, as_json)
