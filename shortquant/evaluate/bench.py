"""Prompt-processing and generation speed, measured the way ``llama-bench`` does.

* ``pp<N>``: N random tokens (BOS first) decoded from an empty cache in batches of up to
  2048 (micro-batches of 512), only the last token's logits requested;
* ``tg<N>``: N single-token decodes from an empty cache, each followed by a sync;
* one warm-up run first (a whole pp run; one generated token for tg), then ``reps`` timed
  runs; the rate of each run is tokens / seconds, reported as mean and sample std.

Example::

    speed = bench_file("model-Q4_K_M.gguf", threads=8)
    print(speed["pp512"]["mean"], speed["tg128"]["mean"])
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from shortquant.errors import BackendError
from shortquant.evaluate import llama_backend

CUDA_INSTALL = ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
                'llama-cpp-python')
BENCH_BATCH = 2048
BENCH_UBATCH = 512


def require_gpu_offload() -> None:
    """Raise BackendError with install advice when llama.cpp has no GPU backend."""
    if not llama_backend.supports_gpu_offload():
        raise BackendError(
            "--gpu-layers needs a GPU build of llama-cpp-python, and the installed one is "
            f"CPU-only; install a CUDA build with: {CUDA_INSTALL}")


def backend_for(gpu_layers: int) -> str:
    """The backend that runs the layers: the first non-CPU backend when offloading."""
    names = llama_backend.backend_names()
    if gpu_layers > 0:
        gpu = [n for n in names if n.upper() != "CPU"]
        if gpu:
            return gpu[0]
    return "CPU"


def _rate_stats(rates: list[float]) -> dict:
    return {"mean": statistics.fmean(rates),
            "std": statistics.stdev(rates) if len(rates) > 1 else 0.0}


def _prompt_run(model, n_prompt: int, rng) -> None:
    done = 0
    while done < n_prompt:
        n = min(n_prompt - done, model.n_batch)
        tokens = rng.integers(0, model.n_vocab, size=n, dtype=np.int32)
        if done == 0 and model.add_bos:
            tokens[0] = model.bos
        model.decode(tokens, pos0=done, outputs_from=n - 1)
        done += n
    model.synchronize()


def _gen_run(model, n_gen: int, rng) -> None:
    token = model.bos if model.add_bos else int(rng.integers(0, model.n_vocab))
    for pos in range(n_gen):
        model.decode([token], pos0=pos, outputs_from=0)
        model.synchronize()
        token = int(rng.integers(0, model.n_vocab))


def _timed(model, run, n_tokens: int, reps: int, warmup_tokens: int, rng) -> dict:
    if warmup_tokens:
        model.clear()
        run(model, warmup_tokens, rng)
    rates = []
    for _ in range(reps):
        model.clear()
        start = time.perf_counter()
        run(model, n_tokens, rng)
        rates.append(n_tokens / (time.perf_counter() - start))
    return _rate_stats(rates)


def bench_file(path, *, n_prompt: int = 512, n_gen: int = 128, reps: int = 5,
               threads: int | None = None, gpu_layers: int = 0, warmup: bool = True,
               seed: int = 0) -> dict:
    """``{"pp512": {"mean","std"}, "tg128": {...}, "threads", "gpu_layers", "backend"}``.

    Example::

        bench_file("m.gguf", n_prompt=64, n_gen=16, reps=2, threads=2)
    """
    if gpu_layers > 0:
        require_gpu_offload()
    if reps < 1 or n_prompt < 0 or n_gen < 0 or (n_prompt == 0 and n_gen == 0):
        raise BackendError("bench needs --reps >= 1 and a positive --pp or --tg")
    rng = np.random.default_rng(seed)
    result = {}
    n_ctx = max(n_prompt, n_gen, 16)
    n_batch = max(1, min(BENCH_BATCH, n_prompt or 1))
    with llama_backend.LlamaModel(path, n_ctx=n_ctx, n_batch=n_batch,
                                  n_ubatch=min(BENCH_UBATCH, n_batch), n_threads=threads,
                                  n_gpu_layers=gpu_layers) as model:
        if n_prompt:
            result[f"pp{n_prompt}"] = _timed(model, _prompt_run, n_prompt, reps,
                                             n_prompt if warmup else 0, rng)
        if n_gen:
            result[f"tg{n_gen}"] = _timed(model, _gen_run, n_gen, reps, 1 if warmup else 0, rng)
        result["threads"] = model.n_threads
    result["gpu_layers"] = gpu_layers
    result["backend"] = backend_for(gpu_layers)
    return result
