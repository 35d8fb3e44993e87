"""Perplexity: llama-perplexity's chunking rules, checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shortquant.errors import EvalError
from shortquant.evaluate.perplexity import (DEFAULT_TEXT, NllStats, read_text, split_chunks)

CTX = 128


@pytest.fixture
def model(demo_gguf):
    """The embedded demo model as F32 GGUF: a real trained model."""
    pytest.importorskip("llama_cpp")
    return demo_gguf


def test_split_chunks_follows_llama_perplexity():
    tokens = np.arange(1000)
    chunks = split_chunks(tokens, 128)
    assert chunks.shape == (7, 128)  # 1000 // 128, the tail is dropped
    assert chunks[1, 0] == 128
    assert split_chunks(tokens, 128, n_chunks=3).shape == (3, 128)
    assert split_chunks(np.arange(256), 128).shape == (2, 128)  # exactly 2 x ctx is enough


def test_too_short_text_says_how_many_tokens_are_needed():
    with pytest.raises(EvalError, match=r"tokenizes to 255 tokens; --ctx 128 needs at least 256"):
        split_chunks(np.arange(255), 128, source="t.txt")


def test_read_text_drops_one_trailing_newline(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one\n\n")
    assert read_text(path) == "one\n"
    with pytest.raises(EvalError, match="text file not found"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(EvalError, match="not UTF-8"):
        read_text(tmp_path / "bin.txt")


def test_nll_stats_error_formula():
    nll = np.array([1.0, 2.0, 3.0, 4.0])
    stats = NllStats()
    stats.add(nll[:2])
    stats.add(nll[2:])
    assert stats.ppl == pytest.approx(math.exp(2.5))
    # standard error of the mean (population variance over n - 1), times PPL
    assert stats.err == pytest.approx(math.sqrt(1.25 / 3) * math.exp(2.5))


def _reference_perplexity(path, text, ctx):
    """Independent: llama-cpp-python's high-level API, every logit, numpy float64."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                          flash_attn=True, verbose=False, n_threads=1, n_threads_batch=1)
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    nll = []
    for start in range(0, len(tokens) // ctx * ctx, ctx):
        chunk = tokens[start:start + ctx]
        llm.reset()
        llm.eval([llm.token_bos()] + chunk[1:])
        logits = np.array(llm.scores[:ctx], dtype=np.float64)
        for pos in range(ctx // 2, ctx - 1):
            row = logits[pos]
            log_z = row.max() + np.log(np.exp(row - row.max()).sum())
            nll.append(log_z - row[chunk[pos + 1]])
    llm.close()
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    err = math.sqrt((np.mean(nll ** 2) - nll.mean() ** 2) / (len(nll) - 1)) * ppl
    return ppl, err, len(tokens)


def test_perplexity_matches_independent_numpy(model):
    from shortquant.evaluate.runner import evaluate_files

    data = evaluate_files([model], None, ctx=CTX, threads=1)
    ppl, err, n_tokens = _reference_perplexity(model, read_text(DEFAULT_TEXT), CTX)
    entry = data["files"][0]
    assert entry["ppl"] == pytest.approx(ppl, rel=1e-4)
    assert entry["ppl_err"] == pytest.approx(err, rel=1e-3)
    assert data["settings"]["text"]["tokens"] == n_tokens
    assert data["settings"]["chunks"] == n_tokens // CTX
    assert entry["type"] == "F32" and entry["bpw"] == pytest.approx(32.0)
    assert 5.0 < entry["ppl"] < 40.0  # a trained model on its kind of text (~20; random weights: ~512)


def test_text_shorter_than_two_chunks_is_refused(tmp_path, model):
    from shortquant.evaluate.runner import evaluate_files

    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.\n")
    with pytest.raises(EvalError) as info:
        evaluate_files([model], short, ctx=CTX)
    assert "needs at least 256" in str(info.value) and str(short) in str(info.value)


def test_same_number_as_llama_perplexity(model):
    """Runs only where scripts/llama_cpp_tools.py has built llama-perplexity (cached)."""
    from llama_cpp_tools import cached_tool, run_llama_perplexity
    from shortquant.evaluate.perplexity import open_for_eval, perplexity

    tool = cached_tool()
    if tool is None:
        pytest.skip("no cached llama-perplexity build (python scripts/llama_cpp_tools.py llama-perplexity)")
    ref_ppl, ref_err = run_llama_perplexity(tool, model, DEFAULT_TEXT, CTX, threads=1)
    with open_for_eval(model, CTX, threads=1) as loaded:
        ours = perplexity(loaded, read_text(DEFAULT_TEXT), CTX)
    assert f"{ours.ppl:.4f}" == f"{ref_ppl:.4f}"
    assert ours.err == pytest.approx(ref_err, abs=1e-5)
