"""End to end: tiny transformers checkpoints in every pruned layout -> GGUF -> llama.cpp logits.

Each test builds a random LLaMA with transformers, saves it in a given layout and format,
exports it with the CLI, loads the GGUF through llama-cpp-python and compares the logits of a
fixed token sequence (and greedy text) with transformers' forward pass of the original model.
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from checkpoints import TinySpec, build_model, edit_config, rename_layers, save_model
from llama_eval import gguf_greedy, gguf_logits, hf_greedy, hf_logits
from shortquant import keys
from shortquant.cli import main

TOKENS = [1, 17, 250, 3, 99, 411, 7, 128, 300, 45, 6, 2, 77, 500, 31, 260]
PROMPT = [1, 17, 250]
INIT = {"initializer_range": 0.05}  # logits of a few units, so greedy choices have margins


def export(src, out, *quants, extra=()):
    args = ["export", str(src), "--out", str(out), "--quiet"]
    for q in quants:
        args += ["--quant", q]
    result = CliRunner().invoke(main, args + list(extra))
    assert result.exit_code == 0, result.output
    return {q: next(out.glob(f"*-{q.upper()}.gguf")) for q in quants}


def make(tmp_path, tokenizer, *, layers=4, safe=True, shard=None, gaps=None, config_layers=None, **spec):
    tok_path, vocab = tokenizer
    model = build_model(TinySpec(num_hidden_layers=layers, vocab_size=vocab, extra=dict(INIT), **spec))
    src = save_model(model, tmp_path / "src", safe=safe, max_shard_size=shard, tokenizer_model=tok_path)
    if gaps is not None:
        rename_layers(src, dict(enumerate(gaps)))
    if config_layers is not None:
        edit_config(src, num_hidden_layers=config_layers)
    return model, src


def reader_value(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


LAYOUTS = {
    # name: (make kwargs, expected source blocks in the GGUF, expected source block count)
    "contiguous-safetensors": (dict(), None, None),
    "gapped-sharded-safetensors": (dict(gaps=[0, 1, 3, 4], shard="200KB"), [0, 1, 3, 4], None),
    "stale-config-bin": (dict(safe=False, config_layers=6), None, 6),
    "gapped-sharded-bin": (dict(safe=False, shard="200KB", gaps=[0, 2, 5, 7], config_layers=8), [0, 2, 5, 7], 8),
    "contiguous-bin": (dict(safe=False), None, None),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_export_f32_matches_transformers(tmp_path, small_tokenizer, layout):
    kwargs, source_blocks, source_count = LAYOUTS[layout]
    model, src = make(tmp_path, small_tokenizer, **kwargs)
    suffix = ".safetensors" if kwargs.get("safe", True) else ".bin"
    weights = [p for p in src.iterdir() if p.suffix in (".safetensors", ".bin")]
    assert weights and all(p.suffix == suffix for p in weights)
    if "shard" in kwargs:
        assert len(list(src.glob("*.index.json"))) == 1 and len(weights) > 1
    path = export(src, tmp_path / "out", "f32")["f32"]

    reader = gguf.GGUFReader(path)
    assert reader_value(reader, "llama.block_count") == 4
    assert reader_value(reader, keys.SOURCE_BLOCKS) == source_blocks
    assert reader_value(reader, keys.SOURCE_BLOCK_COUNT) == source_count

    ref, got = hf_logits(model, TOKENS), gguf_logits(path, TOKENS)
    assert np.abs(got - ref).max() < 1e-3
    assert gguf_greedy(path, PROMPT, 32) == hf_greedy(model, PROMPT, 32)


@pytest.mark.parametrize("spec", [
    dict(head_dim=32),                                  # explicit head_dim != hidden / n_head
    dict(tie_word_embeddings=True),
    dict(num_attention_heads=8, num_key_value_heads=2),  # GQA 4:1
    dict(extra_rope={"rope_type": "linear", "factor": 2.0}, rope_theta=50000.0),
], ids=["head_dim", "tied", "gqa4", "rope-linear"])
def test_hparam_variants_match_transformers(tmp_path, small_tokenizer, spec):
    spec = dict(spec)
    rope = spec.pop("extra_rope", None)
    model, src = make(tmp_path, small_tokenizer, **spec)
    if rope:
        edit_config(src, rope_scaling=rope)
        from transformers import LlamaForCausalLM
        model = LlamaForCausalLM.from_pretrained(src, dtype="float32").eval()
    path = export(src, tmp_path / "out", "f32")["f32"]
    if spec.get("tie_word_embeddings"):
        names = [t.name for t in gguf.GGUFReader(path).tensors]
        assert "output.weight" not in names
    assert np.abs(gguf_logits(path, TOKENS) - hf_logits(model, TOKENS)).max() < 1e-3


def test_f16_bf16_q8_0_close_to_transformers(tmp_path, small_tokenizer):
    """Half-precision exports: bounded by the rounding of weights *and* activations.

    ggml's CPU matmul rounds the activations to the weight type too, and the error compounds
    over blocks; f16 keeps 11 significant bits (relative step 2^-11), bf16 8 (2^-8), so the
    bounds are a few hundred times those steps relative to the logit scale; measured here
    f16 ~0.1% and bf16 ~0.7% of the scale.
    """
    model, src = make(tmp_path, small_tokenizer)
    files = export(src, tmp_path / "out", "f16", "bf16", "q8_0")
    ref = hf_logits(model, TOKENS)
    scale = np.abs(ref).max()
    bounds = {"f16": 0.01, "bf16": 0.04, "q8_0": 0.05}
    for quant, path in files.items():
        err = np.abs(gguf_logits(path, TOKENS) - ref).max() / scale
        assert err < bounds[quant], (quant, err)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(files["q8_0"]).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_q8_0_bytes_equal_gguf_py_reference(tmp_path, small_tokenizer):
    """Our Q8_0 blocks are exactly what gguf-py's reference quantizer makes of the same rows."""
    from shortquant.transforms import permute_rotary

    model, src = make(tmp_path, small_tokenizer)
    path = export(src, tmp_path / "out", "q8_0")["q8_0"]
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    checks = {
        "blk.1.ffn_down.weight": state["model.layers.1.mlp.down_proj.weight"],
        "blk.2.attn_q.weight": permute_rotary(state["model.layers.2.self_attn.q_proj.weight"], 4),
        "blk.2.attn_k.weight": permute_rotary(state["model.layers.2.self_attn.k_proj.weight"], 2),
    }
    for name, weight in checks.items():
        expected = gguf.quants.quantize(weight.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.asarray(tensors[name].data).reshape(expected.shape), expected), name


def test_source_blocks_option_and_inspect(tmp_path, small_tokenizer):
    _, src = make(tmp_path, small_tokenizer, config_layers=6)
    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", str(src), "--source-blocks", "0-2,5"])
    assert shown.exit_code == 0, shown.output
    assert "blk.3   <- source block 3, original block 5" in shown.output
    assert "removed original blocks: [3, 4]" in shown.output
    as_json = json.loads(runner.invoke(main, ["inspect", str(src), "--json", "--source-blocks", "0-2,5"]).output)
    assert as_json["blocks"]["original"] == [0, 1, 2, 5] and as_json["blocks"]["source_block_count"] == 6
    path = export(src, tmp_path / "out", "f32", extra=["--source-blocks", "0-2,5"])["f32"]
    reader = gguf.GGUFReader(path)
    assert reader_value(reader, keys.SOURCE_BLOCKS) == [0, 1, 2, 5]
    assert reader_value(reader, keys.SOURCE_BLOCK_COUNT) == 6


def test_stale_config_warns_and_writes_true_block_count(tmp_path, small_tokenizer):
    _, src = make(tmp_path, small_tokenizer, config_layers=32)
    result = CliRunner().invoke(main, ["export", str(src), "--out", str(tmp_path / "o"), "--quant", "f16"])
    assert result.exit_code == 0, result.output
    assert result.output.count("num_hidden_layers=32 but the weights hold 4 blocks") == 1
    path = next((tmp_path / "o").glob("*.gguf"))
    assert reader_value(gguf.GGUFReader(path), "llama.block_count") == 4


def test_names_and_size_label(tmp_path, small_tokenizer):
    model, src = make(tmp_path, small_tokenizer)
    named = tmp_path / "st-vicuna-v1.3-7b-taylor"
    shutil.move(src, named)
    path = export(named, tmp_path / "out", "q8_0")["q8_0"]
    n_params = sum(p.numel() for p in model.parameters())
    reader = gguf.GGUFReader(path)
    label = reader_value(reader, gguf.Keys.General.SIZE_LABEL)
    assert label == gguf.utility.size_label(n_params, n_params, 0, 0) and label != "7B"
    assert path.name == f"st-vicuna-v1.3-{label}-taylor-Q8_0.gguf"
    assert reader_value(reader, gguf.Keys.General.FILE_TYPE) == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader_value(reader, gguf.Keys.General.BASENAME) == "st-vicuna-v1.3"
    assert reader_value(reader, gguf.Keys.General.FINETUNE) == "taylor"


def test_piecewise_conversion_gives_identical_files(tmp_path, small_tokenizer, monkeypatch):
    """Reading rows in small pieces (whole heads for Q/K) writes the very same bytes."""
    import shortquant.export as export_module
    import shortquant.stream as stream

    _, src = make(tmp_path, small_tokenizer, num_attention_heads=8, num_key_value_heads=2)
    whole = export(src, tmp_path / "whole", "f32", "q8_0")
    monkeypatch.setattr(stream, "CHUNK_VALUES", 1000)
    plan = export_module.make_model_plan(export_module.open_checkpoint(src), export_module.ExportOptions())
    pieces = stream.pieces(plan)
    q_pieces = [p for p in pieces if p.tensor.name == "blk.0.attn_q.weight"]
    assert len(q_pieces) > 1 and all((p.stop - p.start) % 8 == 0 for p in q_pieces)   # head_dim 8
    piecewise = export(src, tmp_path / "pieces", "f32", "q8_0")
    for quant in ("f32", "q8_0"):
        assert whole[quant].read_bytes() == piecewise[quant].read_bytes()


def test_interrupt_leaves_no_file(tmp_path, small_tokenizer, monkeypatch):
    """Ctrl-C in the middle of writing: no file under the final name, no .part left."""
    import shortquant.ggml as ggml

    _, src = make(tmp_path, small_tokenizer)
    real, calls = ggml.quantize, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ggml, "quantize", interrupted)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(src), "--out", str(out), "--quant", "q8_0", "--quiet"])
    assert result.exit_code == 130
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_bf16_checkpoint_is_widened_exactly(tmp_path, small_tokenizer, safe):
    """Released checkpoints are usually bf16/f16: an f32 export holds exactly those values."""
    import torch

    tok, vocab = small_tokenizer
    model = build_model(TinySpec(vocab_size=vocab, extra=dict(INIT))).to(torch.bfloat16)
    src = save_model(model, tmp_path / "src", safe=safe, tokenizer_model=tok)
    path = export(src, tmp_path / "out", "f32")["f32"]
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    state = model.state_dict()
    assert np.array_equal(tensors["blk.1.ffn_down.weight"], state["model.layers.1.mlp.down_proj.weight"].float().numpy())
    assert np.array_equal(tensors["token_embd.weight"], state["model.embed_tokens.weight"].float().numpy())
    model = model.float()
    assert np.abs(gguf_logits(path, TOKENS) - hf_logits(model, TOKENS)).max() < 1e-3


def test_inspect_shows_types_that_need_an_imatrix():
    """inspect plans an IQ type without an imatrix (export would refuse it)."""
    result = CliRunner().invoke(main, ["inspect", "--quant", "iq2_xxs", "--quant", "q4_k_m"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.strip().startswith("blk.0.attn_q.weight"))
    assert row.split()[3:5] == ["IQ2_XXS", "Q4_K"]
