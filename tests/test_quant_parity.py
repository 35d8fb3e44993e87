"""Byte parity with llama.cpp's quantizer.

A tiny LLaMA model (8 blocks, GQA 8/4, widths multiples of 256, random weights) is written as an
F32 GGUF with gguf-py; ``llama_cpp.llama_model_quantize`` (llama.cpp's own quantizer, in-process)
turns it into each type. For every tensor of llama.cpp's file, our ``choose_types`` must give the
same type and our ``quantize`` the same bytes. With an importance matrix, the imatrix goes through
our GGUF imatrix writer and reader (which reproduces llama-quantize's loader: sums / counts) and
is passed to llama.cpp through ``llama_model_quantize_params.imatrix``, as llama-quantize does.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest

from shortquant.ggml import quantize
from shortquant.quant.imatrix import Imatrix, read_imatrix, write_imatrix
from shortquant.quant.mixes import choose_types
from shortquant.quant.types import parse_quant

T = gguf.GGMLQuantizationType
llama_cpp = pytest.importorskip("llama_cpp")


# ---------------------------------------------------------------------------------------------
# Building the model and running llama.cpp
# ---------------------------------------------------------------------------------------------

def tiny_tokenizer(writer: gguf.GGUFWriter, vocab: int) -> None:
    """A minimal sentencepiece-style vocabulary: unk/bos/eos, 256 byte tokens, then pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(vocab)])
    writer.add_token_types([int(t) for t in types])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def write_f32_model(path: Path, *, n_layer=8, hidden=256, ffn=512, n_head=8, n_head_kv=4, vocab=512, seed=0):
    """An F32 LLaMA GGUF with random weights; returns {name: float32 array (rows, cols)}."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // n_head
    kv = head_dim * n_head_kv

    def w(rows, cols):
        # heavy-ish tails and per-column scales so imatrix weighting and block scales matter
        return (rng.standard_t(5, size=(rows, cols)) * rng.uniform(0.2, 2.0, size=cols) * 0.02).astype(np.float32)

    tensors = {"token_embd.weight": w(vocab, hidden)}
    for i in range(n_layer):
        tensors |= {
            f"blk.{i}.attn_norm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32),
            f"blk.{i}.attn_q.weight": w(hidden, hidden),
            f"blk.{i}.attn_k.weight": w(kv, hidden),
            f"blk.{i}.attn_v.weight": w(kv, hidden),
            f"blk.{i}.attn_output.weight": w(hidden, hidden),
            f"blk.{i}.ffn_norm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32),
            f"blk.{i}.ffn_gate.weight": w(ffn, hidden),
            f"blk.{i}.ffn_up.weight": w(ffn, hidden),
            f"blk.{i}.ffn_down.weight": w(hidden, ffn),
        }
    tensors["output_norm.weight"] = np.ones(hidden, dtype=np.float32)
    tensors["output.weight"] = w(vocab, hidden)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("parity-test")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(n_layer)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tiny_tokenizer(writer, vocab)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def llama_quantize(src: Path, dst: Path, quant: str, importance: dict[str, np.ndarray] | None = None,
                   threads: int = 2) -> int:
    """llama.cpp's quantizer, in-process; returns its status (0 = success)."""
    L = llama_cpp.llama_cpp
    params = L.llama_model_quantize_default_params()
    params.ftype = int(parse_quant(quant).file_type)
    params.nthread = threads
    keep = []
    if importance:
        entries = (L.llama_model_imatrix_data * (len(importance) + 1))()  # null-name terminated
        for k, (name, values) in enumerate(importance.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep += [name.encode(), values]
            entries[k].name = keep[-2]
            entries[k].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[k].size = values.size
        params.imatrix = entries
        keep.append(entries)
    return L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))


def make_imatrix(tensors: dict[str, np.ndarray], tmp: Path, seed=1) -> dict[str, np.ndarray]:
    """Random activation statistics for every block weight, through our GGUF imatrix file."""
    rng = np.random.default_rng(seed)
    sums, counts = {}, {}
    for name, data in tensors.items():
        if name.startswith("blk.") and data.ndim == 2:
            n_tokens = 4 * 128
            sums[name] = (rng.gamma(0.5, 2.0, size=(1, data.shape[1])) * n_tokens).astype(np.float32)
            counts[name] = np.array([n_tokens], dtype=np.float32)
    path = tmp / "model.imatrix.gguf"
    write_imatrix(path, Imatrix(sums, counts, datasets=["random"], chunk_count=4, chunk_size=128))
    return read_imatrix(path).importance()


def assert_parity(reference: Path, tensors: dict[str, np.ndarray], quant: str, *, n_layer, n_head, n_head_kv,
                  importance=None):
    """Every tensor of llama.cpp's file: our type and our bytes are the same."""
    reader = gguf.GGUFReader(reference)
    assert reader.get_field(gguf.Keys.General.FILE_TYPE).contents() == parse_quant(quant).file_type
    ours = choose_types([(n, a.shape) for n, a in tensors.items()], quant=quant, n_layer=n_layer,
                        n_head=n_head, n_head_kv=n_head_kv, has_imatrix=importance is not None)
    assert sorted(t.name for t in reader.tensors) == sorted(tensors)
    type_diff, byte_diff = [], []
    for t in reader.tensors:
        if ours[t.name] != t.tensor_type:
            type_diff.append((t.name, t.tensor_type.name, ours[t.name].name))
            continue
        mine = quantize(tensors[t.name], t.tensor_type, imatrix=(importance or {}).get(t.name), threads=2)
        if mine.tobytes() != np.asarray(t.data).tobytes():
            byte_diff.append((t.name, t.tensor_type.name))
    assert not type_diff, f"{quant}: types differ (name, llama.cpp, ours): {type_diff}"
    assert not byte_diff, f"{quant}: bytes differ: {byte_diff}"
    return {t.name: t.tensor_type for t in reader.tensors}


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

SHAPE = dict(n_layer=8, n_head=8, n_head_kv=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    path = folder / "tiny-f32.gguf"
    tensors = write_f32_model(path, **SHAPE)
    return folder, path, tensors


@pytest.fixture(scope="module")
def importance(model):
    folder, _, tensors = model
    return make_imatrix(tensors, folder)


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k", "iq4_xs"])
def test_bytes_match_llama_cpp(model, quant):
    folder, src, tensors = model
    dst = folder / f"tiny-{quant}.gguf"
    assert llama_quantize(src, dst, quant) == 0
    types = assert_parity(dst, tensors, quant, **SHAPE)
    # the mix really mixes: more than one quantized type in the k-quant mixes
    if quant in ("q4_k_m", "q3_k_m", "q2_k", "q5_k_m"):
        assert len({t for t in types.values() if t != T.F32}) > 1


@pytest.mark.parametrize("quant", ["q4_k_m", "iq3_xxs", "q4_0", "iq4_xs"])
def test_bytes_match_llama_cpp_with_imatrix(model, importance, quant):
    folder, src, tensors = model
    dst = folder / f"tiny-{quant}-imat.gguf"
    assert llama_quantize(src, dst, quant, importance) == 0
    assert_parity(dst, tensors, quant, importance=importance, **SHAPE)
    # the imatrix changed the bytes (it is really used, by both)
    name = "blk.2.ffn_up.weight"
    qtype = {t.name: t.tensor_type for t in gguf.GGUFReader(dst).tensors}[name]
    assert quantize(tensors[name], qtype, imatrix=importance[name]).tobytes() != quantize(tensors[name], qtype).tobytes()


def test_iq3_xxs_without_imatrix_refused_by_both(model):
    from shortquant.errors import QuantError

    folder, src, tensors = model
    assert llama_quantize(src, folder / "refused.gguf", "iq3_xxs") != 0
    with pytest.raises(QuantError, match="importance matrix"):
        choose_types([(n, a.shape) for n, a in tensors.items()], quant="iq3_xxs", **SHAPE)


@pytest.mark.parametrize("quant", ["q4_k_m", "q8_0", "q2_k", "iq4_xs"])
def test_row_length_fallbacks_match_llama_cpp(tmp_path, quant):
    """Rows of 320 (not a multiple of 256) and 176 (not even of 32) fall back like llama.cpp's."""
    shape = dict(n_layer=8, n_head=10, n_head_kv=5)
    src = tmp_path / "odd-f32.gguf"
    tensors = write_f32_model(src, hidden=320, ffn=176, vocab=384, **shape)
    dst = tmp_path / f"odd-{quant}.gguf"
    assert llama_quantize(src, dst, quant) == 0
    types = assert_parity(dst, tensors, quant, **shape)
    assert types["blk.0.ffn_down.weight"] == T.F16       # 176 fits no block type
    if quant == "q4_k_m":
        assert types["blk.1.attn_q.weight"] == T.Q5_0     # Q4_K -> Q5_0
        assert types["output.weight"] == T.Q8_0           # output of a non-256 row


def test_real_trained_model_matches_llama_cpp(tmp_path, demo_gguf):
    """A real trained model: the demo (depth-pruned to 6 blocks), weights no generator made."""
    reader = gguf.GGUFReader(demo_gguf)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
               for t in reader.tensors}
    shape = {key: int(reader.get_field(f"llama.{field}").contents())
             for key, field in (("n_layer", "block_count"), ("n_head", "attention.head_count"),
                                ("n_head_kv", "attention.head_count_kv"))}
    for quant in ("q4_k_m", "q6_k", "q3_k_s"):
        dst = tmp_path / f"demo-{quant}.gguf"
        assert llama_quantize(demo_gguf, dst, quant) == 0
        assert_parity(dst, tensors, quant, **shape)
