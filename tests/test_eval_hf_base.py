"""A Hugging Face model folder as the base: transformers' logits give the same perplexity as
llama.cpp's, KLD against the same weights is ~0, and a base of another vocabulary is refused."""

from __future__ import annotations

import numpy as np
import pytest

from checkpoints import TinySpec, build_model, save_model
from shortquant.errors import EvalError
from shortquant.resources import demo_model

DEMO = demo_model()   # a trained Hugging Face checkpoint (float16 safetensors)
CTX = 128


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The test machines are small and shared: spinning extra threads only slows them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(demo_gguf):
    """The demo model exported to F32 GGUF; its Hugging Face folder (``DEMO``) is the base."""
    pytest.importorskip("llama_cpp")
    return demo_gguf


@pytest.fixture(scope="module")
def chunks(model):
    from shortquant.evaluate.llama_backend import LlamaModel
    from shortquant.evaluate.perplexity import DEFAULT_TEXT, read_text, split_chunks

    with LlamaModel(model, n_ctx=CTX, vocab_only=True) as vocab:
        return split_chunks(vocab.tokenize(read_text(DEFAULT_TEXT)), CTX)


def test_perplexity_from_transformers_logits_matches_ours(model, chunks):
    """Same chunking rules recomputed in numpy from transformers' logits (issue 4's parity test)."""
    from shortquant.evaluate.kld import hf_logits
    from shortquant.evaluate.runner import evaluate_files

    inputs = [np.concatenate([[1], c[1:]]) for c in chunks]  # BOS replaces the first token
    nll = []
    for chunk, logits in zip(chunks, hf_logits(DEMO, inputs)):
        rows = logits[CTX // 2:CTX - 1].astype(np.float64)
        top = rows.max(axis=1, keepdims=True)
        log_z = (top + np.log(np.exp(rows - top).sum(axis=1, keepdims=True)))[:, 0]
        nll.append(log_z - rows[np.arange(len(rows)), chunk[CTX // 2 + 1:]])
    reference = float(np.exp(np.concatenate(nll).mean()))

    ours = evaluate_files([model], None, ctx=CTX, threads=1)["files"][0]["ppl"]
    assert ours == pytest.approx(reference, rel=1e-4)


def test_kld_against_the_same_weights_in_transformers_is_near_zero(model, tmp_path):
    from shortquant.evaluate.runner import evaluate_files

    data = evaluate_files([model], None, ctx=CTX, base=DEMO, n_chunks=8, threads=1,
                          cache_dir=tmp_path)
    kld = data["files"][0]["kld"]
    assert abs(kld["mean"]) < 1e-3  # f16 KV cache in llama.cpp vs f32 in torch
    assert kld["same_top1"] > 0.98
    assert data["settings"]["base"] == str(DEMO.resolve())


def test_tiny_random_transformers_base(tmp_path, model, chunks):
    """hf_logits on a tiny model from tests/checkpoints.py, and KLD of a real model against it."""
    import torch

    from shortquant.evaluate.kld import hf_logits
    from shortquant.evaluate.runner import evaluate_files

    spec = TinySpec(vocab_size=512, max_position_embeddings=CTX)
    tiny = build_model(spec)
    folder = save_model(tiny, tmp_path / "tiny")
    first = [np.concatenate([[1], chunks[0][1:]])]
    logits = next(hf_logits(folder, first))
    with torch.no_grad():
        expected = tiny(input_ids=torch.as_tensor(first[0][None, :].astype(np.int64))).logits[0]
    assert logits.shape == (CTX, 512) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)

    data = evaluate_files([model], None, ctx=CTX, base=folder, n_chunks=4, threads=1,
                          cache_dir=tmp_path / "cache")
    kld = data["files"][0]["kld"]
    assert kld["mean"] > 0.5  # a trained model against random weights: far apart
    assert kld["same_top1"] < 0.5


def test_transformers_base_with_another_vocabulary_is_refused(tmp_path, model):
    from shortquant.evaluate.runner import evaluate_files

    folder = save_model(build_model(TinySpec(vocab_size=1000)), tmp_path / "tiny1000")
    with pytest.raises(EvalError, match=r"another vocabulary \(1000 tokens, the evaluated files 512\)"):
        evaluate_files([model], None, ctx=CTX, base=folder, cache_dir=tmp_path / "cache")
