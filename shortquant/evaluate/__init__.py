"""Verify GGUF files: perplexity, KL divergence against a base, speed, reports.

Example::

    from shortquant.evaluate import evaluate_files
    data = evaluate_files(["m-Q4_K_M.gguf"], "wiki.test.raw", ctx=512, base="m-F16.gguf")
"""

from shortquant.evaluate.runner import bench_files, evaluate_files

__all__ = ["evaluate_files", "bench_files"]
