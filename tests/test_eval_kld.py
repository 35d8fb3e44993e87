"""KL divergence against a base: zero against itself, ordered by quantization, cached once,
refusing bases and files that do not fit."""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest

from shortquant.errors import EvalError
from shortquant.evaluate.kld import STEP, WINDOW, dequantize_logprobs, quantize_logprobs

CTX = 128
CHUNKS = 16


@pytest.fixture(scope="module")
def quants(tmp_path_factory, demo_gguf):
    """The demo model's F32 file quantized by llama.cpp itself to a few types."""
    llama_cpp = pytest.importorskip("llama_cpp")
    folder = tmp_path_factory.mktemp("quants")
    out = {"f32": demo_gguf}
    for name in ("q8_0", "q4_k_m", "q4_0"):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")
        params.nthread = 2
        path = folder / f"demo-{name}.gguf"
        assert llama_cpp.llama_model_quantize(str(demo_gguf).encode(), str(path).encode(),
                                              ctypes.byref(params)) == 0
        out[name] = path
    return out


def _evaluate(paths, base, cache_dir, **kw):
    from shortquant.evaluate.runner import evaluate_files

    return evaluate_files(paths, None, ctx=CTX, base=base, n_chunks=CHUNKS, threads=1,
                          cache_dir=cache_dir, **kw)


def test_logprob_compaction_is_within_half_a_step():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(5, 300))
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    q, top = quantize_logprobs(lp)
    back, kept = dequantize_logprobs(q, top)
    inside = lp >= (lp.max(axis=1, keepdims=True) - WINDOW + 1e-6)
    assert np.array_equal(kept[inside], np.ones(inside.sum(), bool))
    assert np.abs(back - lp)[kept].max() <= STEP / 2 + 1e-6
    assert q.dtype == np.uint16


def test_file_against_itself_is_zero(quants, tmp_path):
    data = _evaluate([quants["f32"], quants["q8_0"]], quants["f32"], tmp_path)
    kld = data["files"][0]["kld"]
    assert abs(kld["mean"]) < 1e-5
    assert kld["same_top1"] == 1.0
    assert kld["dp_mean"] == 0.0 and kld["dp_rms"] == 0.0
    assert set(kld) == {"mean", "err", "p99_9", "p99", "p95", "p90", "median", "p10", "p5", "p1",
                        "dp_mean", "dp_rms", "same_top1"}
    assert data["files"][1]["kld"]["mean"] > 1e-5   # q8_0 of the demo: ~4e-5, measurably not zero


def test_kld_grows_as_bits_shrink(quants, tmp_path):
    data = _evaluate([quants["q8_0"], quants["q4_k_m"], quants["q4_0"]], quants["f32"], tmp_path)
    mean = {f["type"]: f["kld"]["mean"] for f in data["files"]}
    top1 = {f["type"]: f["kld"]["same_top1"] for f in data["files"]}
    assert mean["Q4_0"] > mean["Q4_K_M"] > mean["Q8_0"] > 0
    assert top1["Q4_0"] < top1["Q8_0"] < 1.0
    q4 = data["files"][2]["kld"]
    assert q4["p99_9"] >= q4["p99"] >= q4["p95"] >= q4["p90"] >= q4["median"] >= q4["p10"] >= q4["p5"] >= q4["p1"]


def test_kld_matches_direct_float64_kl(quants, tmp_path):
    """Independent: full logits of both files from the high-level API, KL in numpy."""
    import llama_cpp

    from shortquant.evaluate.perplexity import DEFAULT_TEXT, read_text

    def all_logits(path, chunks):
        llm = llama_cpp.Llama(str(path), n_ctx=CTX, n_batch=CTX, n_ubatch=CTX, logits_all=True,
                              flash_attn=True, verbose=False, n_threads=1, n_threads_batch=1)
        out = []
        for chunk in chunks:
            llm.reset()
            llm.eval([llm.token_bos()] + list(chunk[1:]))
            out.append(np.array(llm.scores[CTX // 2:CTX - 1], dtype=np.float64))
        llm.close()
        return np.concatenate(out)

    text = read_text(DEFAULT_TEXT)
    tokenizer = llama_cpp.Llama(str(quants["f32"]), vocab_only=True, verbose=False)
    tokens = tokenizer.tokenize(text.encode(), add_bos=True)
    chunks = np.array(tokens[: CHUNKS * CTX]).reshape(CHUNKS, CTX)
    base, test = all_logits(quants["f32"], chunks), all_logits(quants["q4_0"], chunks)
    def log_softmax(x):
        shifted = x - x.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    lp_base, lp_test = log_softmax(base), log_softmax(test)
    kl = (np.exp(lp_base) * (lp_base - lp_test)).sum(axis=1)
    same = (base.argmax(1) == test.argmax(1)).mean()

    # one chunk per batch, as the high-level API evaluates them (the batch layout moves
    # quantized results by a few percent of the KLD, so the layouts must agree)
    ours = _evaluate([quants["q4_0"]], quants["f32"], tmp_path, n_batch=CTX)["files"][0]["kld"]
    assert ours["mean"] == pytest.approx(kl.mean(), abs=1e-5, rel=1e-3)
    assert ours["median"] == pytest.approx(np.median(kl), abs=1e-5, rel=1e-3)
    assert ours["same_top1"] == pytest.approx(same, abs=1e-9)


def test_base_is_computed_once_and_reusable(quants, tmp_path):
    first = _evaluate([quants["q4_0"]], quants["f32"], tmp_path)
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    stamp = (entries[0] / "q.npy").stat().st_mtime_ns
    second = _evaluate([quants["q4_0"]], quants["f32"], tmp_path)
    assert (entries[0] / "q.npy").stat().st_mtime_ns == stamp
    assert second["files"][0]["kld"] == first["files"][0]["kld"]
    # the cache folder itself is a valid --base ("precomputed base logits")
    third = _evaluate([quants["q4_0"]], entries[0], tmp_path / "unused")
    assert third["files"][0]["kld"] == first["files"][0]["kld"]
    # compact: 2 bytes per vocabulary entry per scored token
    rows = CHUNKS * (CTX - CTX // 2 - 1)
    assert (entries[0] / "q.npy").stat().st_size < rows * 512 * 2 + 4096


def _copy_with_bigger_vocab(src, dst, extra):
    """A copy of ``src`` with ``extra`` more (unused) tokens: a model of another vocabulary."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch="llama")
    padded = {gguf.Keys.Tokenizer.LIST: [f"<extra_{i}>" for i in range(extra)],
              gguf.Keys.Tokenizer.SCORES: [0.0] * extra,
              gguf.Keys.Tokenizer.TOKEN_TYPE: [gguf.TokenType.USER_DEFINED] * extra}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        value = field.contents() + padded.get(name, []) if name in padded else field.contents()
        writer.add_key_value(name, value, vtype,
                             sub_type=field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None)
    grown = {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight",
             gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"}
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name in grown:
            data = np.concatenate([data, np.zeros((extra, data.shape[1]), data.dtype)])
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_base_with_another_vocabulary_is_refused(quants, tmp_path):
    other = _copy_with_bigger_vocab(quants["f32"], tmp_path / "other-vocab.gguf", 88)
    with pytest.raises(EvalError, match=r"another vocabulary \(600 tokens, the evaluated files 512\)"):
        _evaluate([quants["q8_0"]], other, tmp_path / "cache")
    # and the other way round: the cached base of one vocabulary against a file of another
    _evaluate([quants["q8_0"]], quants["f32"], tmp_path / "cache2")
    cache = next((tmp_path / "cache2").iterdir())
    with pytest.raises(EvalError, match="another vocabulary"):
        _evaluate([other], cache, tmp_path / "cache3")


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is text, not a model\n")
    from shortquant.evaluate.runner import evaluate_files

    with pytest.raises(EvalError, match=r"model.gguf: not a GGUF file"):
        evaluate_files([fake], None, ctx=CTX)


def test_gguf_llama_cpp_cannot_load_gives_its_reason_on_one_line(tmp_path):
    pytest.importorskip("llama_cpp")
    bad = tmp_path / "no-hparams.gguf"
    writer = gguf.GGUFWriter(str(bad), arch="llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from shortquant.evaluate.runner import evaluate_files

    with pytest.raises(EvalError) as info:
        evaluate_files([bad], None, ctx=CTX)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{bad}: llama.cpp cannot load it: ")
    assert "llama.context_length" in message  # llama.cpp's own words


def test_same_kld_as_llama_perplexity(quants, tmp_path):
    """Runs only where scripts/llama_cpp_tools.py has built llama-perplexity (cached)."""
    from llama_cpp_tools import cached_tool, run_llama_kld
    from shortquant.evaluate.perplexity import DEFAULT_TEXT

    tool = cached_tool()
    if tool is None:
        pytest.skip("no cached llama-perplexity build (python scripts/llama_cpp_tools.py llama-perplexity)")
    ref = run_llama_kld(tool, quants["q4_0"], quants["f32"], DEFAULT_TEXT, CTX, tmp_path / "base.kld",
                        threads=1)
    from shortquant.evaluate.runner import evaluate_files

    ours = evaluate_files([quants["q4_0"]], None, ctx=CTX, base=quants["f32"], threads=1,
                          cache_dir=tmp_path)["files"][0]["kld"]
    # llama.cpp rounds base log-probs differently (uint16 over [max-16, max]): same to ~1e-4
    assert ours["mean"] == pytest.approx(ref["mean"], rel=1e-3)
    assert ours["err"] == pytest.approx(ref["err"], rel=1e-2)
    assert ours["same_top1"] == pytest.approx(ref["same_top1"], abs=1e-5)
