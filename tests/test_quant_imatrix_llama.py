"""An imatrix computed through llama.cpp's evaluation callback: the same statistics as the torch
path on the same model, the same as llama-imatrix where its build is cached, and the command."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from checkpoints import TinySpec, build_model, save_model
from shortquant.cli import main
from shortquant.quant.imatrix import compute_imatrix, read_imatrix

CTX, CHUNKS = 32, 3
TEXT = ("Once upon a time there was a little robot who liked to count the stars. "
        "Every night it climbed the hill behind the house and wrote the numbers down. ") * 12


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_tokenizer):
    """(HF model, its folder, its F32 GGUF)."""
    pytest.importorskip("llama_cpp")
    tok_path, vocab = small_tokenizer
    folder = tmp_path_factory.mktemp("imatrix_llama")
    model = build_model(TinySpec(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 vocab_size=vocab, extra={"initializer_range": 0.05}))
    src = save_model(model, folder / "src", tokenizer_model=tok_path)
    result = CliRunner().invoke(main, ["export", str(src), "--out", str(folder / "out"), "--quiet",
                                       "--quant", "f32"])
    assert result.exit_code == 0, result.output
    return model, src, next((folder / "out").glob("*-F32.gguf"))


def test_same_statistics_as_the_torch_path(exported):
    from shortquant.quant.imatrix_llama import compute_imatrix_gguf, gguf_tokens

    model, _, gguf_file = exported
    tokens = gguf_tokens(gguf_file, TEXT)
    ours = compute_imatrix_gguf(gguf_file, tokens, ctx=CTX, chunks=CHUNKS, threads=2, dataset="t",
                                progress=False)
    torch_im = compute_imatrix(model, tokens.tolist(), ctx=CTX, chunks=CHUNKS, bos_id=1, progress=False)
    assert sorted(ours.sums) == sorted(torch_im.sums) and len(ours.sums) == 7 * 3
    for name in ours.sums:
        assert ours.counts[name].tolist() == torch_im.counts[name].tolist() == [CTX * CHUNKS]
        # llama.cpp keeps K and V in f16: a few 1e-3 apart at most
        np.testing.assert_allclose(ours.sums[name], torch_im.sums[name], rtol=5e-3)
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (CHUNKS, CTX, ["t"])


def test_single_chunk_batches_give_the_same_sums(exported):
    """One chunk per decode (-b ctx) or several: the batch layout barely moves the sums."""
    from shortquant.quant.imatrix_llama import compute_imatrix_gguf, gguf_tokens

    _, _, gguf_file = exported
    tokens = gguf_tokens(gguf_file, TEXT)
    many = compute_imatrix_gguf(gguf_file, tokens, ctx=CTX, chunks=CHUNKS, progress=False)
    one = compute_imatrix_gguf(gguf_file, tokens, ctx=CTX, chunks=CHUNKS, n_batch=CTX, progress=False)
    for name in many.sums:
        np.testing.assert_allclose(one.sums[name], many.sums[name], rtol=1e-4)


def test_command_on_a_gguf_file(exported, tmp_path):
    _, _, gguf_file = exported
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "m.imatrix.gguf"
    result = CliRunner().invoke(main, ["imatrix", str(gguf_file), "--text", str(text), "-o", str(out),
                                       "--ctx", str(CTX), "--chunks", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["entries"] == 21 and summary["chunks"] == 2 and summary["tokens"] > 2 * CTX
    im = read_imatrix(out)
    assert all(c.tolist() == [2 * CTX] for c in im.counts.values())
    # bad input: one line naming the file
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    bad = CliRunner().invoke(main, ["imatrix", str(fake), "--text", str(text)])
    assert bad.exit_code == 2
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "fake.gguf" in lines[0] and "not a GGUF file" in lines[0]


def test_same_numbers_as_llama_imatrix(exported, tmp_path):
    """Runs only where scripts/llama_cpp_tools.py has built llama-imatrix (cached)."""
    from llama_cpp_tools import cached_tool
    from shortquant.quant.imatrix_llama import compute_imatrix_gguf, gguf_tokens

    tool = cached_tool(name="llama-imatrix")
    if tool is None:
        pytest.skip("no cached llama-imatrix build (python scripts/llama_cpp_tools.py llama-imatrix)")
    _, _, gguf_file = exported
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    ref_path = tmp_path / "ref.imatrix.gguf"
    subprocess.run([str(tool), "-m", str(gguf_file), "-f", str(text), "-c", str(CTX), "--chunks", str(CHUNKS),
                    "-t", "2", "-o", str(ref_path), "--no-ppl"], check=True, capture_output=True)
    ref = read_imatrix(ref_path)
    ours = compute_imatrix_gguf(gguf_file, gguf_tokens(gguf_file, read_text_like_llama(text)), ctx=CTX,
                                chunks=CHUNKS, threads=2, progress=False)
    assert sorted(ours.sums) == sorted(ref.sums)
    for name in ref.sums:
        assert ours.counts[name].tolist() == ref.counts[name].tolist()
        np.testing.assert_allclose(ours.sums[name], ref.sums[name], rtol=1e-5)


def read_text_like_llama(path):
    """llama.cpp's -f reads the file as is (a trailing newline included)."""
    return path.read_text()
