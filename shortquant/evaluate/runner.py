"""Evaluate a list of GGUF files in one run: perplexity, KLD against a base, speed.

This is the one entry point the CLI commands and ``export --eval`` call.

Example::

    data = evaluate_files(["m-F32.gguf", "m-Q4_0.gguf"], None, ctx=128, base="m-F32.gguf")
    print(markdown_table(data))
"""

from __future__ import annotations

from pathlib import Path

import gguf

from shortquant import keys
from shortquant.evaluate import llama_backend
from shortquant.evaluate.kld import KldStats, compare_chunk, ensure_base
from shortquant.evaluate.perplexity import (DEFAULT_BATCH, DEFAULT_TEXT, NllStats, chunk_logits, open_for_eval,
                                            read_text, scored_targets, split_chunks, text_sha256,
                                            token_nll)
from shortquant.evaluate.results import hardware_info, make_results, write_results
from shortquant.evaluate.scoring import RowScorer

_GUESSED = 1024  # llama_ftype flag: type guessed from the tensors, not read from the file


def type_name(model) -> str:
    """'Q4_K_M', 'F16', ... from general.file_type (or llama.cpp's guess when absent); an
    optimized mix (``export --optimize`` records its budget) is 'Q4_K_M_OPT', as
    ``gguf_info`` names it, so ``report`` and the card draw it as a series of its own."""
    value = model.meta(gguf.Keys.General.FILE_TYPE)
    number = int(value) if value and value.lstrip("-").isdigit() else model.file_type() & ~_GUESSED
    try:
        name = gguf.LlamaFileType(number).name
    except ValueError:
        name = f"ftype{number}"
    for prefix in ("MOSTLY_", "ALL_"):
        name = name.removeprefix(prefix)
    return name + keys.OPT_SUFFIX if model.meta(keys.OPTIMIZE_BUDGET) is not None else name


def file_info(model, path: Path) -> dict:
    """The size facts of one open file (the measured fields start as None)."""
    n_params = model.n_params
    return {
        "file": path.name,
        "path": str(path.resolve()),
        "type": type_name(model),
        "bytes": path.stat().st_size,
        "n_params": n_params,
        "bpw": model.tensor_bytes * 8 / n_params if n_params else None,
        "ppl": None,
        "ppl_err": None,
        "kld": None,
        "speed": None,
    }


def _progress_factory(quiet: bool):
    def make(total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="chunk", disable=quiet, leave=False)
    return make


def _measure(model, chunks, store, bar) -> tuple[NllStats, KldStats | None]:
    """One pass over the chunks: NLL of every scored token, and KLD when a base is given.

    Each chunk's rows are scored in place in llama.cpp's buffer, over all of the model's
    threads, before the next batch is decoded (as llama-perplexity does).
    """
    nll_stats, kld_stats = NllStats(), (KldStats() if store is not None else None)
    with RowScorer(model.n_threads) as scorer:
        for index, (chunk, logits) in enumerate(chunk_logits(model, chunks, bar)):
            scored, targets = logits[:-1], scored_targets(chunk)  # the last row predicts nothing
            if kld_stats is None:
                nll_stats.add(token_nll(scored, targets, scorer))
                continue
            kld, delta_p, same, nll, _ = compare_chunk(scored, targets, store, index, scorer)
            nll_stats.add(nll)
            kld_stats.add(kld, delta_p, same)
    return nll_stats, kld_stats


def evaluate_files(paths, text_path=None, ctx: int = 512, base=None, *, n_chunks: int | None = None,
                   threads: int | None = None, bench: bool = False, gpu_layers: int = 0,
                   n_prompt: int = 512, n_gen: int = 128, reps: int = 5, n_batch: int = DEFAULT_BATCH,
                   cache_dir=None, quiet: bool = True, output=None) -> dict:
    """Perplexity (and KLD when ``base`` is given, speed when ``bench``) of every file.

    ``text_path`` None means the built-in demo text. ``base`` is a GGUF file, a Hugging Face
    model folder or a cached base-logits folder. ``gpu_layers`` offloads layers (like
    ``-ngl``) for both the measurements and the speed runs. ``n_batch`` is llama-perplexity's
    ``-b``: it decides how many chunks share one batch, which moves the last digits a
    little, so keep the default to compare with llama-perplexity's default. Returns the
    results.json dict (and writes it to ``output`` when given).

    Example::

        evaluate_files(["m-Q8_0.gguf"], "wiki.test.raw", ctx=512, base="m-F16.gguf",
                       output="results.json")
    """
    paths = [llama_backend.check_gguf(p) for p in paths]
    if gpu_layers > 0:
        from shortquant.evaluate.bench import require_gpu_offload

        require_gpu_offload()
    text_file = Path(text_path) if text_path else DEFAULT_TEXT
    text = read_text(text_file)
    progress = _progress_factory(quiet)

    store = None
    if base is not None:
        with llama_backend.LlamaModel(paths[0], n_ctx=ctx, vocab_only=True) as vocab:
            chunks = split_chunks(vocab.tokenize(text), ctx, n_chunks, text_file)
            store = ensure_base(base, chunks, vocab.n_vocab, vocab.add_bos, vocab.bos,
                                cache_dir=cache_dir, threads=threads, n_batch=n_batch,
                                gpu_layers=gpu_layers, progress_factory=progress)

    files, n_tokens, n_used = [], None, None
    for path in paths:
        with open_for_eval(path, ctx, threads, n_batch=n_batch, n_gpu_layers=gpu_layers) as model:
            entry = file_info(model, path)
            tokens = model.tokenize(text)
            chunks = split_chunks(tokens, ctx, n_chunks, text_file)
            n_tokens, n_used = n_tokens or len(tokens), len(chunks)
            if store is not None:
                store.check_compatible(chunks, model.n_vocab, path)
            bar = progress(len(chunks), path.name)
            try:
                nll_stats, kld_stats = _measure(model, chunks, store, bar)
            finally:
                bar.close()
            entry["ppl"], entry["ppl_err"] = nll_stats.ppl, nll_stats.err
            entry["kld"] = kld_stats.summary() if kld_stats else None
        if bench:
            from shortquant.evaluate.bench import bench_file

            entry["speed"] = bench_file(path, n_prompt=n_prompt, n_gen=n_gen, reps=reps,
                                        threads=threads, gpu_layers=gpu_layers)
        files.append(entry)

    settings = {
        "ctx": ctx,
        "chunks": n_used,
        "text": {"path": str(text_file.resolve()), "sha256": text_sha256(text), "tokens": n_tokens},
        "base": str(Path(base).resolve()) if base is not None else None,
        "batch": n_batch,
    }
    data = make_results(files, settings, hardware_info(threads, gpu_layers))
    if output:
        write_results(data, output)
    return data


def bench_files(paths, *, n_prompt: int = 512, n_gen: int = 128, reps: int = 5,
                threads: int | None = None, gpu_layers: int = 0, quiet: bool = True,
                output=None) -> dict:
    """Speed only (no text needed): a results.json dict whose files have ``speed`` set.

    Example::

        bench_files(["m-Q4_0.gguf"], threads=8, gpu_layers=99, output="speed.json")
    """
    from tqdm import tqdm

    from shortquant.evaluate.bench import bench_file, require_gpu_offload

    paths = [llama_backend.check_gguf(p) for p in paths]
    if gpu_layers > 0:
        require_gpu_offload()
    files = []
    for path in tqdm(paths, desc="bench", unit="file", disable=quiet, leave=False):
        with llama_backend.LlamaModel(path, n_ctx=16, vocab_only=True) as model:
            entry = _size_only_info(model, path)
        entry["speed"] = bench_file(path, n_prompt=n_prompt, n_gen=n_gen, reps=reps,
                                    threads=threads, gpu_layers=gpu_layers)
        files.append(entry)
    settings = {"ctx": None, "chunks": None, "text": None, "base": None}
    data = make_results(files, settings, hardware_info(threads, gpu_layers))
    if output:
        write_results(data, output)
    return data


def _size_only_info(model, path: Path) -> dict:
    """file_info without loading weights: n_params and bpw from the GGUF header (gguf-py)."""
    reader = gguf.GGUFReader(str(path))
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    return {"file": path.name, "path": str(path.resolve()), "type": type_name(model),
            "bytes": path.stat().st_size, "n_params": n_params,
            "bpw": tensor_bytes * 8 / n_params if n_params else None,
            "ppl": None, "ppl_err": None, "kld": None, "speed": None}
