"""Click commands of the quantization stage (registered in shortquant/cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import SourceError, TokenizerError


@click.command("imatrix")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration text (UTF-8).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the imatrix (GGUF). Default: MODEL_DIR/imatrix.gguf.")
@click.option("--ctx", default=512, show_default=True, help="Tokens per chunk (llama-imatrix's -c).")
@click.option("--chunks", type=int, default=None, help="Use at most this many chunks (default: all).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--quiet", is_flag=True, help="No progress bar, no summary line.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def imatrix_command(model_dir: Path, text_file: Path, output: Path | None, ctx: int, chunks: int | None,
                    threads: int | None, quiet: bool, as_json: bool) -> None:
    """Compute an importance matrix from a Hugging Face model with torch.

    Runs the calibration text through MODEL_DIR in chunks of --ctx tokens (each starting with
    BOS) and records, for every linear layer of every block, the sum of squared inputs per
    column and the token count: llama-imatrix's statistics, written in its GGUF format, so
    `shortquant export --imatrix` and llama-quantize both accept the file.

    \b
    Example:
      shortquant imatrix ./Shortened-LLaMA-5.5B --text calibration.txt \\
          -o shortened.imatrix.gguf --ctx 512 --chunks 100
    """
    import torch

    from .imatrix import compute_imatrix, write_imatrix

    if not model_dir.is_dir():
        raise SourceError("not a model folder", model_dir)
    tokenizer_file = model_dir / "tokenizer.model"
    if not tokenizer_file.is_file():
        raise TokenizerError("no tokenizer.model (sentencepiece) in the model folder", model_dir)
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read calibration text: {exc}", text_file) from exc
    output = output or model_dir / "imatrix.gguf"
    if threads:
        torch.set_num_threads(threads)

    tokens, bos_id = _tokenize(tokenizer_file, text)
    model = _load_model(model_dir)
    result = compute_imatrix(model, tokens, ctx=ctx, chunks=chunks, bos_id=bos_id,
                             dataset=text_file.name, progress=not (quiet or as_json))
    write_imatrix(output, result)
    summary = {"output": str(output), "entries": len(result.sums), "chunks": result.chunk_count,
               "ctx": ctx, "tokens": len(tokens)}
    if as_json:
        click.echo(json.dumps(summary))
    elif not quiet:
        click.echo(f"wrote {summary['entries']} entries from {summary['chunks']} chunks of {ctx} tokens "
                   f"to {output}")


def _tokenize(tokenizer_file: Path, text: str) -> tuple[list[int], int | None]:
    """Token ids as llama.cpp tokenizes a prompt: BOS first (when the vocabulary has one)."""
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"cannot load sentencepiece model: {exc}", tokenizer_file) from exc
    bos = sp.bos_id()
    bos_id = bos if bos >= 0 else None
    return ([bos_id] if bos_id is not None else []) + sp.encode(text), bos_id


def _load_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"transformers cannot load the model: {exc}", model_dir) from exc
