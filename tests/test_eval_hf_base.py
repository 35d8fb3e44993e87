"""A Hugging Face model folder as the base: transformers' logits give the same perplexity as
llama.cpp's, KLD against the same weights is ~0, and a base of another vocabulary is refused."""

from __future__ import annotations

import numpy as np
import pytest

from checkpoints import FIXTURES, TinySpec, build_model, save_model
from shortquant.errors import EvalError

STORIES = FIXTURES / "stories260K.gguf"
CTX = 128


def _unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-rotary row order of a Q or K projection."""
    out_dim, in_dim = weight.shape
    return (weight.reshape(n_head, out_dim // n_head // 2, 2, in_dim)
            .swapaxes(1, 2).reshape(out_dim, in_dim))


def gguf_to_hf(src, folder):
    """The F32 stories260K GGUF as a transformers LlamaForCausalLM folder (weights only)."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    reader = gguf.GGUFReader(str(src))
    arch = "llama"
    value = lambda key: reader.get_field(key.format(arch=arch)).contents()  # noqa: E731
    n_head = value(gguf.Keys.Attention.HEAD_COUNT)
    n_kv = value(gguf.Keys.Attention.HEAD_COUNT_KV)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    name = lambda kind, i=None: (gguf.TENSOR_NAMES[kind].format(bid=i) + ".weight")  # noqa: E731
    T = gguf.MODEL_TENSOR
    config = LlamaConfig(
        hidden_size=value(gguf.Keys.LLM.EMBEDDING_LENGTH),
        intermediate_size=value(gguf.Keys.LLM.FEED_FORWARD_LENGTH),
        num_hidden_layers=value(gguf.Keys.LLM.BLOCK_COUNT),
        num_attention_heads=n_head, num_key_value_heads=n_kv,
        vocab_size=tensors[name(T.TOKEN_EMBD)].shape[0],
        rms_norm_eps=value(gguf.Keys.Attention.LAYERNORM_RMS_EPS),
        max_position_embeddings=value(gguf.Keys.LLM.CONTEXT_LENGTH),
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    state = {"model.embed_tokens.weight": tensors[name(T.TOKEN_EMBD)],
             "model.norm.weight": tensors[name(T.OUTPUT_NORM)],
             "lm_head.weight": tensors[name(T.OUTPUT)]}
    per_block = {T.ATTN_NORM: "input_layernorm", T.FFN_NORM: "post_attention_layernorm",
                 T.ATTN_Q: "self_attn.q_proj", T.ATTN_K: "self_attn.k_proj",
                 T.ATTN_V: "self_attn.v_proj", T.ATTN_OUT: "self_attn.o_proj",
                 T.FFN_GATE: "mlp.gate_proj", T.FFN_UP: "mlp.up_proj", T.FFN_DOWN: "mlp.down_proj"}
    for i in range(config.num_hidden_layers):
        for kind, hf_name in per_block.items():
            weight = tensors[name(kind, i)]
            if kind == T.ATTN_Q:
                weight = _unpermute_rows(weight, n_head)
            elif kind == T.ATTN_K:
                weight = _unpermute_rows(weight, n_kv)
            state[f"model.layers.{i}.{hf_name}.weight"] = weight
    model = LlamaForCausalLM(config)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                          strict=True)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The test machines are small and shared: spinning extra threads only slows them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_stories(tmp_path_factory):
    if not STORIES.is_file():
        pytest.skip(f"{STORIES} not present")
    pytest.importorskip("llama_cpp")
    return gguf_to_hf(STORIES, tmp_path_factory.mktemp("hf") / "stories260K-hf")


@pytest.fixture(scope="module")
def chunks():
    if not STORIES.is_file():
        pytest.skip(f"{STORIES} not present")
    from shortquant.evaluate.llama_backend import LlamaModel
    from shortquant.evaluate.perplexity import DEFAULT_TEXT, read_text, split_chunks

    with LlamaModel(STORIES, n_ctx=CTX, vocab_only=True) as vocab:
        return split_chunks(vocab.tokenize(read_text(DEFAULT_TEXT)), CTX)


def test_perplexity_from_transformers_logits_matches_ours(hf_stories, chunks):
    """Same chunking rules recomputed in numpy from transformers' logits (issue 4's parity test)."""
    from shortquant.evaluate.kld import hf_logits
    from shortquant.evaluate.runner import evaluate_files

    inputs = [np.concatenate([[1], c[1:]]) for c in chunks]  # BOS replaces the first token
    nll = []
    for chunk, logits in zip(chunks, hf_logits(hf_stories, inputs)):
        rows = logits[CTX // 2:CTX - 1].astype(np.float64)
        top = rows.max(axis=1, keepdims=True)
        log_z = (top + np.log(np.exp(rows - top).sum(axis=1, keepdims=True)))[:, 0]
        nll.append(log_z - rows[np.arange(len(rows)), chunk[CTX // 2 + 1:]])
    reference = float(np.exp(np.concatenate(nll).mean()))

    ours = evaluate_files([STORIES], None, ctx=CTX, threads=1)["files"][0]["ppl"]
    assert ours == pytest.approx(reference, rel=1e-4)


def test_kld_against_the_same_weights_in_transformers_is_near_zero(hf_stories, tmp_path):
    from shortquant.evaluate.runner import evaluate_files

    data = evaluate_files([STORIES], None, ctx=CTX, base=hf_stories, n_chunks=8, threads=1,
                          cache_dir=tmp_path)
    kld = data["files"][0]["kld"]
    assert abs(kld["mean"]) < 1e-3  # f16 KV cache in llama.cpp vs f32 in torch
    assert kld["same_top1"] > 0.98
    assert data["settings"]["base"] == str(hf_stories.resolve())


def test_tiny_random_transformers_base(tmp_path, chunks):
    """hf_logits on a tiny model from tests/checkpoints.py, and KLD of a real model against it."""
    import torch

    from shortquant.evaluate.kld import hf_logits
    from shortquant.evaluate.runner import evaluate_files

    spec = TinySpec(vocab_size=512, max_position_embeddings=CTX)
    model = build_model(spec)
    folder = save_model(model, tmp_path / "tiny")
    first = [np.concatenate([[1], chunks[0][1:]])]
    logits = next(hf_logits(folder, first))
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(first[0][None, :].astype(np.int64))).logits[0]
    assert logits.shape == (CTX, 512) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)

    data = evaluate_files([STORIES], None, ctx=CTX, base=folder, n_chunks=4, threads=1,
                          cache_dir=tmp_path / "cache")
    kld = data["files"][0]["kld"]
    assert kld["mean"] > 0.5  # a trained model against random weights: far apart
    assert kld["same_top1"] < 0.5


def test_transformers_base_with_another_vocabulary_is_refused(tmp_path):
    if not STORIES.is_file():
        pytest.skip(f"{STORIES} not present")
    from shortquant.evaluate.runner import evaluate_files

    folder = save_model(build_model(TinySpec(vocab_size=1000)), tmp_path / "tiny1000")
    with pytest.raises(EvalError, match=r"another vocabulary \(1000 tokens, the evaluated files 512\)"):
        evaluate_files([STORIES], None, ctx=CTX, base=folder, cache_dir=tmp_path / "cache")
