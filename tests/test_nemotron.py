"""Nemotron / Minitron (``NemotronForCausalLM`` -> llama.cpp's ``nemotron``): layernorm1p, norm
biases, squared-ReLU MLP without gate, partial rotary; whole and depth-pruned with gaps, against
transformers' logits, greedy text and llama.cpp's quantizer; what llama.cpp's ``nemotron`` cannot
hold (query rows != hidden_size, per-block widths) refused in one line."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from checkpoints import edit_config, rename_layers
from families import build_family_model, make_bpe_tokenizer
from llama_eval import gguf_greedy, gguf_logits, hf_greedy, hf_logits
from shortquant import keys
from shortquant.cli import main
from test_export_parity import assert_same_file_contents
from test_quant_parity import llama_quantize

TOKENS = [1, 17, 250, 3, 99, 311, 7, 128, 300, 45, 6, 2, 77, 200, 31, 260, 12, 9, 140, 88]
PROMPT = [1, 17, 250]
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             partial_rotary_factor=0.5, norm_eps=1e-5, attn_implementation="eager")
LAYOUTS = {"whole": None, "depth-gaps": [0, 2, 3, 6]}


def run(*args, ok=True):
    result = CliRunner().invoke(main, [*map(str, args), "--quiet"])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def nemotron(src, **overrides):
    vocab = make_bpe_tokenizer(src, "llama3")
    model = build_family_model("nemotron", vocab, **{**SHAPE, **overrides})
    with torch.no_grad():   # layernorm1p stores weight - 1: make it clearly not 0 (nor 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(src)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nemotron")
    out = {}
    for layout, stored in LAYOUTS.items():
        src = tmp / layout
        model = nemotron(src)
        if stored:
            rename_layers(src, dict(enumerate(stored)))
            edit_config(src, num_hidden_layers=8)
        quants = ["f32", "q8_0", "q4_k_m"] if stored is None else ["f32"]
        dest = tmp / "out" / layout
        run("export", src, "--out", dest, "--pre", "llama-bpe", *(a for q in quants for a in ("-q", q)))
        out[layout] = (model, {q: next(dest.glob(f"*-{q.upper()}.gguf")) for q in quants})
    return tmp, out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_f32_logits_and_greedy_match_transformers(exported, layout):
    _, out = exported
    model, files = out[layout]
    reader = gguf.GGUFReader(files["f32"])
    assert reader.get_field("general.architecture").contents() == "nemotron"
    assert reader.get_field("nemotron.rope.dimension_count").contents() == 32       # 64 * 0.5
    assert reader.get_field("nemotron.attention.layer_norm_epsilon").contents() == pytest.approx(1e-5)
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_norm.bias", "blk.0.ffn_norm.bias", "output_norm.bias"} <= names
    assert not any("ffn_gate" in n for n in names)
    source = reader.get_field(keys.SOURCE_BLOCKS)
    assert (source.contents() if source else None) == LAYOUTS[layout]
    ref, got = hf_logits(model, TOKENS), gguf_logits(files["f32"], TOKENS)
    scale = np.abs(ref).max()
    print(f"nemotron {layout}: max |logit diff| {np.abs(got - ref).max():.2e} of scale {scale:.2f}")
    assert np.abs(got - ref).max() < 1e-3 * scale, (np.abs(got - ref).max(), scale)
    assert gguf_greedy(files["f32"], PROMPT, 16) == hf_greedy(model, PROMPT, 16)


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_bytes_match_llama_quantize(exported, quant):
    tmp, out = exported
    files = out["whole"][1]
    reference = tmp / f"llama-nemotron-{quant}.gguf"
    assert llama_quantize(files["f32"], reference, quant) == 0
    assert_same_file_contents(files[quant], reference, quant)


def test_minitron_8b_head_dim_is_refused_in_one_line(tmp_path):
    """Minitron-8B's shape (heads * head_dim != hidden_size): llama.cpp's nemotron sizes the query
    as hidden_size, so no file it could load exists; refused before anything is written."""
    src = tmp_path / "src"
    nemotron(src, head_dim=96)
    result = run("export", src, "--out", tmp_path / "out", "--pre", "llama-bpe", "-q", "f32", ok=False)
    assert result.exit_code == 2, result.output
    assert "4 heads of head_dim 96 make 384 query rows, not hidden_size 256" in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.gguf"))


def test_per_block_widths_are_refused_in_one_line(tmp_path):
    src = tmp_path / "src"
    nemotron(src)
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:384].contiguous()
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"][:, :384].contiguous()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    result = run("export", src, "--out", tmp_path / "out", "--pre", "llama-bpe", "-q", "f32", ok=False)
    assert result.exit_code == 2, result.output
    assert "the blocks differ (FFN widths differ (384..512))" in result.output and "nemotron" in result.output


def test_torch_model_of_the_depth_pruned_folder_is_the_exported_one(exported, tmp_path):
    """The torch model of the depth-pruned Nemotron folder (imatrix FOLDER, eval --base FOLDER):
    built from the tensors, blocks renumbered, the gate-less MLP kept, it is the model exported."""
    from shortquant.families.hf_model import load_torch_model

    tmp, out = exported
    model, files = out["depth-gaps"]
    ours = load_torch_model(tmp / "depth-gaps")
    ref = hf_logits(model, TOKENS)   # (built with eager attention; the loaded one with transformers' default)
    assert np.abs(hf_logits(ours, TOKENS) - ref).max() < 1e-5 * np.abs(ref).max()
