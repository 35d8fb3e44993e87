"""Width-pruned and sub-block-dropped LLaMA models written as llama.cpp's ``deci`` (per-layer head
counts and FFN widths), end to end: tiny transformers models carrying the pruned shapes with their
stale configs (tests/pruned.py) against llama.cpp's logits and greedy text, byte parity with
llama.cpp's quantizer on our f32 ``deci`` files, and one test per llama.cpp behaviour we work
around (each fails when llama.cpp changes it, so the stand-in can go).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

import pruned
from families import EVAL_TEXT
from llama_eval import gguf_greedy, gguf_logits, hf_greedy, hf_logits
from shortquant import keys
from shortquant.cli import main
from shortquant.families.deci import ZERO_FFN, ffn_mult_to_width
from test_bad_input import assert_one_line_error, run_export
from test_export_parity import assert_same_file_contents
from test_quant_parity import llama_quantize

TOKENS = [1, 17, 250, 3, 99, 311, 7, 128, 300, 45, 6, 2, 77, 200, 31, 260, 12, 9, 140, 88]
PROMPT = [1, 17, 250]
QUANTS = ["q8_0", "q4_k_m"]
TESTS = Path(__file__).resolve().parent


def run(*args):
    result = CliRunner().invoke(main, [*map(str, args), "--quiet"])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deci")
    out = {}
    for name, build in pruned.LAYOUTS.items():
        model, src = build(tmp / name)
        run("export", src, "--out", tmp / "out" / name, "--pad-ffn", "0",   # pruned widths as they are
            *(a for q in ["f32", *QUANTS] for a in ("-q", q)))
        files = {q: next((tmp / "out" / name).glob(f"*-{q.upper()}.gguf")) for q in ["f32", *QUANTS]}
        out[name] = (model, src, files)
    return tmp, out


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def assert_same_logits(path, model):
    ref, got = hf_logits(model, TOKENS), gguf_logits(path, TOKENS)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 1e-3 * scale, (np.abs(got - ref).max(), scale)


# Per-layer values as written: (head_count, head_count_kv, feed_forward_length), stand-ins included.
WRITTEN = {
    "llm-pruner": ([4, 2, 4, 2], [2, 1, 2, 2], [512, 384, 320, 448]),
    "flap": ([4, 2, 4, 4], [2, 1, 2, 2], [448, 512, 256, 384]),
    "llm-drop": ([4, 4, 0, 4, 4], [0, 2, 0, 2, 2], [512, ZERO_FFN, 512, 512, ZERO_FFN]),
    "decilm": ([4, 4, 0, 4], [2, 0, 0, 1], [512, 256, 768, ZERO_FFN]),
}


@pytest.mark.parametrize("layout", list(pruned.LAYOUTS))
def test_f32_logits_and_greedy_match_transformers(exported, layout):
    _, out = exported
    model, _, files = out[layout]
    reader = gguf.GGUFReader(files["f32"])
    assert field(reader, "general.architecture") == "deci"
    heads, kv, ffn = WRITTEN[layout]
    assert field(reader, "deci.attention.head_count") == heads
    assert field(reader, "deci.attention.head_count_kv") == kv
    assert field(reader, "deci.feed_forward_length") == ffn
    assert field(reader, "deci.attention.key_length") == pruned.HEAD_DIM
    assert_same_logits(files["f32"], model)
    assert gguf_greedy(files["f32"], PROMPT, 16) == hf_greedy(model, PROMPT, 16)


def test_uniformly_pruned_model_stays_llama_with_the_tensors_shapes(tmp_path):
    model, src = pruned.uniform_stale(tmp_path / "src")
    result = CliRunner().invoke(main, ["export", str(src), "--out", str(tmp_path / "out"), "-q", "f32",
                                       "--pad-ffn", "0"])
    assert result.exit_code == 0, result.output
    assert "intermediate_size=512 but the tensors hold 384" in result.output
    path = next((tmp_path / "out").glob("*.gguf"))
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "llama"
    assert (field(reader, "llama.attention.head_count"), field(reader, "llama.attention.head_count_kv"),
            field(reader, "llama.feed_forward_length")) == (2, 1, 384)
    assert_same_logits(path, model)


def test_removed_sub_blocks_recorded_and_shown(exported):
    _, out = exported
    reader = gguf.GGUFReader(out["llm-drop"][2]["f32"])
    assert field(reader, keys.REMOVED_ATTENTION) == [0, 2]
    assert field(reader, keys.REMOVED_MLP) == [1, 4]
    assert field(gguf.GGUFReader(out["llm-pruner"][2]["f32"]), keys.REMOVED_MLP) is None
    names = {t.name for t in reader.tensors}
    assert "blk.2.attn_norm.weight" not in names and "blk.2.attn_q.weight" not in names
    result = CliRunner().invoke(main, ["inspect", str(out["llm-drop"][1])])
    assert result.exit_code == 0, result.output
    assert "why deci: no attention in blocks [0, 2]; no MLP in blocks [1, 4]" in result.output
    assert "blk.1   heads 4/2, no MLP" in result.output


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("layout", list(pruned.LAYOUTS))
def test_quantized_bytes_match_llama_quantize(exported, layout, quant):
    tmp, out = exported
    files = out[layout][2]
    reference = tmp / f"llama-{layout}-{quant}.gguf"
    assert llama_quantize(files["f32"], reference, quant) == 0
    assert_same_file_contents(files[quant], reference, quant)


@pytest.mark.parametrize("layout", list(pruned.LAYOUTS))
def test_quantized_files_load_and_generate(exported, layout):
    _, out = exported
    model, _, files = out[layout]
    ref = hf_logits(model, TOKENS)
    got = gguf_logits(files["q8_0"], TOKENS)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert len(gguf_greedy(files["q4_k_m"], PROMPT, 8)) == 8


def test_padded_ffn_is_exact_and_gets_k_quants(tmp_path):
    """By default pruned FFN widths get zero channels up to a multiple of 256 (the unpruned width,
    512 in block 0, is left alone); same logits, ffn_down in K-quants, still byte-identical to
    llama.cpp's quantizer on our (padded) f32 file."""
    model, src = pruned.llm_pruner(tmp_path / "src")
    run("export", src, "--out", tmp_path / "out", "-q", "f32", "-q", "q4_k_m")
    f32, q4 = (next((tmp_path / "out").glob(f"*-{q}.gguf")) for q in ("F32", "Q4_K_M"))
    assert field(gguf.GGUFReader(f32), "deci.feed_forward_length") == [512, 512, 512, 512]
    assert_same_logits(f32, model)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q4).tensors}
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(4)} <= {"Q4_K", "Q6_K"}
    assert llama_quantize(f32, tmp_path / "ref.gguf", "q4_k_m") == 0
    assert_same_file_contents(q4, tmp_path / "ref.gguf", "q4_k_m")


def test_card_summarises_block_shapes(exported):
    from shortquant.publish.card import write_card

    _, out = exported
    folder = out["llm-drop"][2]["f32"].parent
    text = write_card(folder, progress=False).read_text()
    assert "## Block shapes" in text
    for row in ["| 0 | removed | 512 channels |", "| 1 | 4 heads, 2 KV heads | removed |",
                "| 2 | removed | 512 channels |", "| 3 | 4 heads, 2 KV heads | 512 channels |",
                "| 4 | 4 heads, 2 KV heads | removed |"]:
        assert row in text, text
    pruner = write_card(out["llm-pruner"][2]["f32"].parent, progress=False).read_text()
    assert "| 1 | 2 heads, 1 KV heads | 384 channels |" in pruner


@pytest.mark.parametrize("layout", ["llm-pruner", "llm-drop", "decilm"])
def test_imatrix_from_the_hf_folder_matches_llama_cpp(exported, layout):
    """The torch imatrix of the checkpoint folder (built with each block's own modules, see
    shortquant/families/hf_model.py) has llama.cpp's numbers on our deci file."""
    from shortquant.families.hf_model import load_torch_model
    from shortquant.quant.imatrix import compute_imatrix
    from shortquant.quant.imatrix_llama import compute_imatrix_gguf, gguf_tokens

    _, out = exported
    model, src, files = out[layout]
    hf = load_torch_model(src)
    # the same weights; only the attention kernel differs (transformers' sdpa here, eager in pruned.py)
    assert np.abs(hf_logits(hf, TOKENS) - hf_logits(model, TOKENS)).max() < 1e-5
    tokens = gguf_tokens(files["f32"], EVAL_TEXT.read_text(encoding="utf-8")[:4000])
    theirs = compute_imatrix_gguf(files["f32"], tokens, ctx=32, chunks=2, threads=2, progress=False)
    ours = compute_imatrix(hf, tokens.tolist(), ctx=32, chunks=2, bos_id=1, progress=False)
    stand_ins = {t.name for t in gguf.GGUFReader(files["f32"]).tensors
                 if t.name.endswith(("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "attn_output.weight"))
                 and not np.any(t.data)}
    assert set(ours.sums) == set(theirs.sums) - stand_ins
    for name in ours.sums:
        np.testing.assert_allclose(ours.sums[name], theirs.sums[name], rtol=5e-3, atol=1e-6)


def test_imatrix_of_the_hf_folder_drives_a_padded_export(exported, tmp_path):
    """The torch imatrix (unpadded widths) fits the default, padded export; q4_k_m with it is
    byte-identical to llama.cpp's quantizer given the same (padded) importance."""
    from shortquant.export import ExportOptions, load_importance, make_model_plan
    from shortquant.source.checkpoint import open_checkpoint

    _, out = exported
    _, src, _ = out["llm-pruner"]
    calib = tmp_path / "calib.txt"
    calib.write_text(EVAL_TEXT.read_text(encoding="utf-8")[:4000])
    imatrix = tmp_path / "m.imatrix.gguf"
    run("imatrix", src, "--text", calib, "-o", imatrix, "--ctx", "32", "--chunks", "2")
    run("export", src, "--out", tmp_path / "out", "-q", "f32", "-q", "q4_k_m", "--imatrix", imatrix)
    f32, q4 = (next((tmp_path / "out").glob(f"*-{q}.gguf")) for q in ("F32", "Q4_K_M"))
    assert field(gguf.GGUFReader(f32), "deci.feed_forward_length") == [512, 512, 512, 512]
    plan = make_model_plan(open_checkpoint(src), ExportOptions())
    importance = load_importance(imatrix, plan)
    assert importance["blk.1.ffn_down.weight"].size == 512
    assert llama_quantize(f32, tmp_path / "ref.gguf", "q4_k_m", importance) == 0
    assert_same_file_contents(q4, tmp_path / "ref.gguf", "q4_k_m")


@pytest.mark.parametrize("layout", ["flap", "decilm"])
def test_eval_against_the_hf_folder(exported, layout):
    """``eval --base FOLDER`` runs the checkpoint with each block's own modules: KLD of the f32 file ~0."""
    _, out = exported
    _, src, files = out[layout]
    result = CliRunner().invoke(main, ["eval", str(files["f32"]), "--base", str(src), "--ctx", "32", "--chunks", "2",
                                       "--json", "--quiet", "--threads", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert 0 <= data["files"][0]["kld"]["mean"] < 1e-5


def test_decilm_ffn_width_formula():
    # llama.cpp's converter (conversion/deci.py): int(2 * mult * d / 3) rounded up to 256
    assert ffn_mult_to_width(5.25, 8192) == 28672       # Llama-3_1-Nemotron-51B's full width
    assert ffn_mult_to_width(1.0, 256) == 256 and ffn_mult_to_width(4.0, 256) == 768


# --- the llama.cpp behaviours worked around (each test fails once llama.cpp changes) ------------

def rewrite(src: Path, dst: Path, arrays: dict[str, list[int]], drop: set[str]) -> Path:
    """A copy of an f32 GGUF with some per-layer arrays changed and some tensors left out."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, field(reader, "general.architecture"))
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        value = arrays.get(f.name, f.contents())
        writer.add_key_value(f.name, value, f.types[0], f.types[1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        if t.name not in drop:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def ffn_tensors(block: int) -> set[str]:
    return {f"blk.{block}.{k}.weight" for k in ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}


def run_elsewhere(path: Path) -> subprocess.CompletedProcess:
    """Evaluate a file in another process (llama.cpp aborts on some of them)."""
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); from llama_eval import gguf_logits; " \
           f"gguf_logits({str(path)!r}, {TOKENS!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_llama_cpp_still_drops_attention_of_a_layer_without_ffn(exported, tmp_path):
    """``feed_forward_length = 0`` skips the layer's residual update: block 1's attention is lost."""
    _, out = exported
    model, _, files = out["llm-drop"]
    heads, kv, ffn = WRITTEN["llm-drop"]
    path = rewrite(files["f32"], tmp_path / "ffn0.gguf", {"deci.feed_forward_length": [512, 0, 512, 512, ZERO_FFN]},
                   ffn_tensors(1))
    without_attention = copy.deepcopy(model)
    pruned.drop_attention(without_attention.model.layers[1])
    got = gguf_logits(path, TOKENS)
    ref, lost = hf_logits(model, TOKENS), hf_logits(without_attention, TOKENS)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() > 1e-2 * scale, \
        "llama.cpp now keeps the attention of a layer with feed_forward_length 0: the zero-FFN stand-in can go"
    assert np.abs(got - lost).max() < 1e-3 * scale


def test_llama_cpp_still_aborts_when_the_last_layer_has_no_ffn(exported, tmp_path):
    _, out = exported
    path = rewrite(out["llm-drop"][2]["f32"], tmp_path / "last-ffn0.gguf",
                   {"deci.feed_forward_length": [512, ZERO_FFN, 512, 512, 0]}, ffn_tensors(4))
    result = run_elsewhere(path)
    assert result.returncode != 0, "llama.cpp now runs a last layer with feed_forward_length 0: " \
                                   "the zero-FFN stand-in can go"
    assert "GGML_ASSERT" in result.stderr, result.stderr[-2000:]


def test_llama_cpp_still_fails_on_layer_0_without_attention(exported, tmp_path):
    _, out = exported
    path = rewrite(out["llm-drop"][2]["f32"], tmp_path / "attn0.gguf",
                   {"deci.attention.head_count": [0, 4, 0, 4, 4]},
                   {"blk.0.attn_norm.weight", "blk.0.attn_output.weight"})
    result = run_elsewhere(path)
    assert result.returncode != 0, "llama.cpp now loads a layer 0 with head_count 0: the linear-attention " \
                                   "stand-in can go"
    assert "Failed to load model" in result.stderr, result.stderr[-2000:]


# --- bad input -----------------------------------------------------------------------------------

def edit_tensors(src: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = src / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


@pytest.fixture
def width_pruned(tmp_path):
    return pruned.llm_pruner(tmp_path / "src")[1]


def layer(i, suffix):
    return f"model.layers.{i}.{suffix}"


@pytest.mark.parametrize("case", ["q_rows", "kv_differ", "gqa", "ffn_widths"])
def test_bad_shapes(tmp_path, width_pruned, case):
    def change(t):
        if case == "q_rows":            # 3.5 heads
            t[layer(1, "self_attn.q_proj.weight")] = t[layer(1, "self_attn.q_proj.weight")][:96]
        elif case == "kv_differ":
            t[layer(2, "self_attn.v_proj.weight")] = t[layer(2, "self_attn.v_proj.weight")][:64]
        elif case == "gqa":             # 3 heads over 2 KV heads
            t[layer(0, "self_attn.q_proj.weight")] = t[layer(0, "self_attn.q_proj.weight")][:192]
        else:
            t[layer(3, "mlp.up_proj.weight")] = t[layer(3, "mlp.up_proj.weight")][:400]
    edit_tensors(width_pruned, change)
    expected = {"q_rows": ("block 1", "q_proj.weight' has 96 rows, not a multiple of head_dim 64"),
                "kv_differ": ("block 2", "k_proj.weight' has 128 rows but 'self_attn.v_proj.weight' has 64"),
                "gqa": ("block 0", "3 attention heads", "not a multiple of 2 KV heads"),
                "ffn_widths": ("block 3", "FFN widths disagree", "up_proj.weight' 400")}[case]
    assert_one_line_error(run_export(width_pruned, tmp_path / "o"), *expected)


def test_drop_list_naming_a_block_with_its_tensors(tmp_path):
    _, src = pruned.llm_drop(tmp_path / "src")
    edit_config(src, drop_mlp_list=[1, 3, 4])
    assert_one_line_error(run_export(src, tmp_path / "o"), "block 3: drop_mlp_list names it but it still has tensor",
                          "mlp.gate_proj.weight")


def test_block_configs_of_another_length(tmp_path):
    _, src = pruned.decilm(tmp_path / "src")
    edit_config(src, block_configs=pruned.DECILM_BLOCKS[:3])
    assert_one_line_error(run_export(src, tmp_path / "o"), "block_configs has 3 entries but the weights hold 4 blocks")


def test_block_configs_contradicting_the_tensors(tmp_path):
    _, src = pruned.decilm(tmp_path / "src")
    blocks = copy.deepcopy(pruned.DECILM_BLOCKS)
    blocks[0]["ffn"]["ffn_mult"] = 4.0
    edit_config(src, block_configs=blocks)
    assert_one_line_error(run_export(src, tmp_path / "o"), "block 0: block_configs says heads 4/2, ffn 768",
                          "tensors hold heads 4/2, ffn 512")


def test_whole_pickled_model_refused_with_a_how_to(tmp_path):
    import torch

    model, src = pruned.llm_pruner(tmp_path / "src")
    (src / "model.safetensors").unlink()
    torch.save({"model": model, "tokenizer": None}, src / "pytorch_model.bin")   # as LLM-Pruner saves it
    assert_one_line_error(run_export(src, tmp_path / "o"), "pytorch_model.bin", "refusing to unpickle code",
                          "save_pretrained")
