"""Importance matrices: computing one from a transformers model, llama.cpp's file formats, checks."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
import torch

from checkpoints import TinySpec, build_model, save_model
from shortquant.errors import QuantError
from shortquant.quant.imatrix import (
    Imatrix,
    chunk_tokens,
    compute_imatrix,
    linear_gguf_names,
    match_model,
    read_imatrix,
    write_imatrix,
)

SPEC = TinySpec(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512)


@pytest.fixture(scope="module")
def model():
    return build_model(SPEC)


def reference_imatrix(model, tokens, ctx, chunks, bos_id):
    """llama-imatrix's definition, computed independently of our hooks: every input that reaches
    torch.nn.functional.linear with a block weight is captured, per chunk of ctx tokens whose
    first token is BOS; sum of squares per input column, count of tokens."""
    by_weight = {p.data_ptr(): name for name, p in model.named_parameters()}
    sums, counts = {}, {}
    real_linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        name = by_weight.get(weight.data_ptr())
        if name and name.startswith("model.layers."):
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + (flat ** 2).sum(0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
        return real_linear(x, weight, bias)

    torch.nn.functional.linear = spy
    try:
        with torch.no_grad():
            for i in range(min(len(tokens) // ctx, chunks)):
                window = list(tokens[i * ctx:(i + 1) * ctx])
                window[0] = bos_id
                model(torch.tensor([window]))
    finally:
        torch.nn.functional.linear = real_linear
    return sums, counts


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def test_matches_direct_computation(model):
    tokens = [1] + np.random.default_rng(0).integers(3, SPEC.vocab_size, 200).tolist()
    ours = compute_imatrix(model, tokens, ctx=48, chunks=3, bos_id=1, dataset="random", progress=False)
    ref_sums, ref_counts = reference_imatrix(model, tokens, 48, 3, 1)
    assert len(ref_sums) == 7 * SPEC.num_hidden_layers
    assert sorted(ours.sums) == sorted(
        f"blk.{i}.{g}.weight" for i in range(SPEC.num_hidden_layers) for g in HF_TO_GGUF.values())
    worst = 0.0
    for hf_name, ref in ref_sums.items():
        layer, rest = hf_name[len("model.layers."):].split(".", 1)
        gguf_name = f"blk.{layer}.{HF_TO_GGUF[rest.removesuffix('.weight')]}.weight"
        mine = ours.sums[gguf_name].reshape(-1)
        ref = ref.numpy()
        worst = max(worst, float(np.max(np.abs(mine - ref) / np.abs(ref))))
        assert ours.counts[gguf_name].tolist() == [ref_counts[hf_name]] == [3 * 48]
    assert worst < 1e-3
    assert ours.chunk_count == 3 and ours.chunk_size == 48 and ours.datasets == ["random"]


def test_chunks_like_llama_imatrix():
    tokens = list(range(100, 200))
    windows = chunk_tokens(tokens, ctx=32, chunks=None, bos_id=1)
    assert len(windows) == 3 and all(len(w) == 32 and w[0] == 1 for w in windows)
    assert windows[1][1:] == tokens[33:64]
    assert len(chunk_tokens(tokens, ctx=32, chunks=2, bos_id=1)) == 2
    with pytest.raises(QuantError, match="fewer than one chunk"):
        chunk_tokens(tokens, ctx=128, chunks=None, bos_id=1)
    with pytest.raises(QuantError, match="at least 16"):
        chunk_tokens(tokens, ctx=8, chunks=None, bos_id=1)


def test_block_map_for_pruned_models(model):
    names = linear_gguf_names(model, {0: 0, 1: 5, 2: 6, 3: 9})
    assert names["model.layers.1.mlp.down_proj"] == "blk.5.ffn_down.weight"
    assert names["model.layers.3.self_attn.o_proj"] == "blk.9.attn_output.weight"
    assert "lm_head" not in names
    with pytest.raises(QuantError, match="source layer 3"):
        linear_gguf_names(model, {0: 0, 1: 1, 2: 2})


def test_gguf_round_trip_and_layout(tmp_path):
    rng = np.random.default_rng(0)
    im = Imatrix(
        sums={"blk.0.attn_q.weight": rng.random((1, 64), dtype=np.float32) * 100,
              "blk.0.ffn_down_exps.weight": rng.random((4, 32), dtype=np.float32) * 100},
        counts={"blk.0.attn_q.weight": np.array([50], np.float32),
                "blk.0.ffn_down_exps.weight": np.array([10, 0, 5, 20], np.float32)},
        datasets=["calib.txt"], chunk_count=5, chunk_size=10)
    path = tmp_path / "x.imatrix.gguf"
    write_imatrix(path, im)
    # the layout llama-imatrix writes
    reader = gguf.GGUFReader(path)
    assert reader.get_field(gguf.Keys.General.TYPE).contents() == "imatrix"
    assert reader.get_field(gguf.Keys.IMatrix.DATASETS).contents() == ["calib.txt"]
    assert reader.get_field(gguf.Keys.General.ARCHITECTURE) is None
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    assert shapes == {"blk.0.attn_q.weight.in_sum2": [64, 1], "blk.0.attn_q.weight.counts": [1, 1],
                      "blk.0.ffn_down_exps.weight.in_sum2": [32, 4], "blk.0.ffn_down_exps.weight.counts": [1, 4]}
    back = read_imatrix(path)
    assert (back.chunk_count, back.chunk_size, back.datasets) == (5, 10, ["calib.txt"])
    values = back.importance()
    np.testing.assert_allclose(values["blk.0.attn_q.weight"], im.sums["blk.0.attn_q.weight"][0] / 50, rtol=1e-6)
    experts = values["blk.0.ffn_down_exps.weight"].reshape(4, 32)
    np.testing.assert_allclose(experts[0], im.sums["blk.0.ffn_down_exps.weight"][0] / 10, rtol=1e-6)
    assert (experts[1] == 1).all()  # an expert that saw no tokens gets 1.0, as llama-quantize does


def test_computed_file_reads_back(model, tmp_path):
    tokens = [1] + list(range(3, 100))
    im = compute_imatrix(model, tokens, ctx=32, bos_id=1, progress=False)
    write_imatrix(tmp_path / "m.gguf", im)
    back = read_imatrix(tmp_path / "m.gguf")
    assert sorted(back.sums) == sorted(im.sums)
    for name in im.sums:
        assert np.array_equal(back.sums[name], im.sums[name]) and np.array_equal(back.counts[name], im.counts[name])


def write_legacy(path, entries, chunks=None, dataset=None):
    """The .dat layout of llama-imatrix's legacy writer."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        out += np.asarray(values, "<f4").tobytes()
    if chunks is not None:
        out += struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()
    path.write_bytes(out)


def test_legacy_dat(tmp_path):
    path = tmp_path / "old.dat"
    write_legacy(path, {"blk.0.attn_k.weight": (4, [8.0, 4.0, 2.0]), "blk.1.attn_k.weight": (0, [3.0, 3.0, 3.0])},
                 chunks=4, dataset="wiki.txt")
    im = read_imatrix(path)
    assert im.legacy and im.chunk_count == 4 and im.datasets == ["wiki.txt"]
    values = im.importance()
    assert values["blk.0.attn_k.weight"].tolist() == [2.0, 1.0, 0.5]
    assert values["blk.1.attn_k.weight"].tolist() == [3.0, 3.0, 3.0]
    write_legacy(tmp_path / "bare.dat", {"a.weight": (1, [1.0])})
    assert read_imatrix(tmp_path / "bare.dat").chunk_count == 0


def test_bad_files(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 7)
    with pytest.raises(QuantError, match="junk.gguf"):
        read_imatrix(tmp_path / "junk.gguf")
    (tmp_path / "junk.dat").write_bytes(b"\x00\x00\x00\x00hello")
    with pytest.raises(QuantError, match="not an imatrix"):
        read_imatrix(tmp_path / "junk.dat")
    with pytest.raises(QuantError, match="cannot read"):
        read_imatrix(tmp_path / "missing.gguf")
    write_legacy(tmp_path / "nan.dat", {"blk.0.attn_q.weight": (1, [1.0, float("nan")])})
    with pytest.raises(QuantError, match="blk.0.attn_q.weight has non-finite"):
        read_imatrix(tmp_path / "nan.dat")
    with pytest.raises(QuantError, match="non-finite"):
        write_imatrix(tmp_path / "inf.gguf", Imatrix({"a.weight": np.array([[np.inf]], np.float32)},
                                                     {"a.weight": np.array([1], np.float32)}))


def test_imatrix_for_another_model():
    im = Imatrix({"blk.0.attn_q.weight": np.ones((1, 64), np.float32),
                  "blk.0.ffn_down.weight": np.ones((1, 128), np.float32)},
                 {"blk.0.attn_q.weight": np.ones(1, np.float32), "blk.0.ffn_down.weight": np.ones(1, np.float32)})
    shapes = {"blk.0.attn_q.weight": (64, 64), "blk.0.ffn_down.weight": (64, 128), "token_embd.weight": (512, 64)}
    assert set(match_model(im, shapes)) == {"blk.0.attn_q.weight", "blk.0.ffn_down.weight"}
    with pytest.raises(QuantError, match=r"blk.0.ffn_down.weight has 128 values .* needs 256"):
        match_model(im, {**shapes, "blk.0.ffn_down.weight": (64, 256)})
    with pytest.raises(QuantError, match="does not have: blk.0.attn_q.weight"):
        match_model(im, {"blk.0.ffn_down.weight": (64, 128)})


def test_imatrix_command(tmp_path, small_tokenizer):
    from click.testing import CliRunner

    from shortquant.quant.commands import imatrix_command

    tokenizer, vocab_size = small_tokenizer
    spec = TinySpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=vocab_size)
    folder = save_model(build_model(spec), tmp_path / "tiny", tokenizer_model=tokenizer)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "tiny.imatrix.gguf"
    result = CliRunner().invoke(imatrix_command, [str(folder), "--text", str(text), "-o", str(out),
                                                  "--ctx", "64", "--chunks", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["chunks"] == 2 and summary["entries"] == 14
    im = read_imatrix(out)
    assert im.chunk_count == 2 and im.chunk_size == 64 and im.datasets == ["calib.txt"]
    assert all(c.tolist() == [128] for c in im.counts.values())
    # bad input: one line, no traceback
    bad = CliRunner().invoke(imatrix_command, [str(tmp_path), "--text", str(text)])
    assert bad.exit_code != 0 and "tokenizer.model" in str(bad.exception)
