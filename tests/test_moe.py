"""Mixture-of-experts end to end: Qwen3-MoE whole, experts removed evenly (fused and hub layouts,
a stale num_experts, expert-index gaps), depth-pruned with gaps, and Mixtral with experts removed;
f32 logits and greedy text against transformers, q8_0 / q4_k_m bytes against llama.cpp's own
quantizer, imatrix expert entries against llama.cpp's evaluation; uneven experts refused."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from checkpoints import edit_config, rename_layers
from families import STYLES, make_bpe_tokenizer
from llama_eval import gguf_greedy, gguf_logits, hf_logits
from moe_models import build_moe_model, remove_experts, save_layout
from shortquant import keys
from shortquant.cli import main
from test_export_parity import assert_same_file_contents
from test_quant_parity import llama_quantize

TOKENS = [1, 17, 250, 3, 99, 311, 7, 128, 300, 45, 6, 2, 77, 200, 31, 260, 12, 9, 140, 88]
PROMPT = [1, 17, 250]
KEEP = {layer: [e for e in range(8) if e not in (1 + layer % 3, 5)] for layer in range(4)}   # 6 of 8, per layer

# name: (family, tokenizer style, layout, experts kept (None: all), config changes, stored blocks);
# "hub-gaps": one tensor per expert under its original index (REAP without renumbering)
CASES = {
    "qwen3moe-whole": ("qwen3moe", "qwen2", "fused", None, {}, None),
    "qwen3moe-experts-fused": ("qwen3moe", "qwen2", "fused", KEEP, {}, None),
    "qwen3moe-experts-hub-stale": ("qwen3moe", "qwen2", "hub", KEEP, {"num_experts": 8}, None),
    "qwen3moe-experts-gaps-stale": ("qwen3moe", "qwen2", "hub-gaps", KEEP, {"num_experts": 8}, None),
    "qwen3moe-depth-gaps": ("qwen3moe", "qwen2", "hub", None, {"num_hidden_layers": 8}, [0, 2, 3, 6]),
    "mixtral-experts-hub": ("mixtral", "llama3", "mixtral-hub", KEEP, {}, None),
}
ARCH = {"qwen3moe": "qwen3moe", "mixtral": "llama"}
PARITY = ("qwen3moe-whole", "qwen3moe-experts-hub-stale", "mixtral-experts-hub")
FAST = ("qwen3moe-experts-gaps-stale", "qwen3moe-depth-gaps")   # logits only: greedy is covered by the others


def run(*args, ok=True):
    result = CliRunner().invoke(main, [*map(str, args), "--quiet"])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def make_case(tmp, case, base):
    family, style, layout, keep, changes, stored = CASES[case]
    src = tmp / case
    vocab = make_bpe_tokenizer(src, style)
    if family not in base:   # one random model per family (building one is slow), copied per case
        base[family] = build_moe_model(family, vocab)
    model = copy.deepcopy(base[family])
    if keep is not None:
        remove_experts(model, keep)
    ids = keep if layout == "hub-gaps" else None
    save_layout(model, src, "hub" if layout == "hub-gaps" else layout, expert_ids=ids)
    if stored is not None:
        rename_layers(src, dict(enumerate(stored)))
    edit_config(src, **changes) if changes else None
    return model, src, ["--pre", STYLES[style][5]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe")
    out, base = {}, {}
    for case in CASES:
        model, src, pre = make_case(tmp, case, base)
        quants = ["f32", "q8_0", "q4_k_m"] if case in PARITY else ["f32"]
        dest = tmp / "out" / case
        result = run("export", src, "--out", dest, *pre, *(a for q in quants for a in ("-q", q)))
        files = {q: next(dest.glob(f"*-{q.upper()}.gguf")) for q in quants}
        out[case] = (model, src, files, result.output)
    return tmp, out


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


@pytest.mark.parametrize("case", list(CASES))
def test_f32_logits_and_greedy_match_transformers(exported, case):
    _, out = exported
    model, _, files, _ = out[case]
    family, _, _, keep, _, stored = CASES[case]
    reader = gguf.GGUFReader(files["f32"])
    arch = ARCH[family]
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.expert_count") == (6 if keep else 8)
    assert field(reader, f"{arch}.expert_used_count") == 2
    assert field(reader, keys.SOURCE_BLOCKS) == stored
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}   # gguf order: (cols, rows, experts)
    assert shapes["blk.3.ffn_gate_exps.weight"] == (256, 256, 6 if keep else 8)
    assert shapes["blk.3.ffn_gate_inp.weight"] == (256, 6 if keep else 8)
    ref, got = hf_logits(model, TOKENS), gguf_logits(files["f32"], TOKENS)
    scale = np.abs(ref).max()
    print(f"{case}: max |logit diff| {np.abs(got - ref).max():.2e} of scale {scale:.2f}")
    assert np.abs(got - ref).max() < 1e-3 * scale, (np.abs(got - ref).max(), scale)
    if case not in FAST:
        assert gguf_greedy(files["f32"], PROMPT, 12) == hf_greedy_cached(model, PROMPT, 12)


def hf_greedy_cached(model, prompt, n):
    """transformers' greedy continuation with its KV cache (the MoE forward is slow on CPU)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([list(prompt)]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def test_stale_counts_and_removed_experts_are_recorded(exported):
    _, out = exported
    *_, files, output = out["qwen3moe-experts-hub-stale"]
    assert "config says 8 experts per block but the tensors hold 6" in output
    reader = gguf.GGUFReader(files["f32"])
    assert field(reader, keys.SOURCE_EXPERT_COUNT) == 8
    assert field(reader, keys.REMOVED_EXPERTS) is None      # renumbered: nothing says which
    gaps = gguf.GGUFReader(out["qwen3moe-experts-gaps-stale"][2]["f32"])
    assert field(gaps, keys.REMOVED_EXPERTS) == [",".join(str(e) for e in range(8) if e not in KEEP[n])
                                                  for n in range(4)]
    depth = gguf.GGUFReader(out["qwen3moe-depth-gaps"][2]["f32"])
    assert field(depth, keys.SOURCE_BLOCK_COUNT) == 8


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("case", PARITY)
def test_quantized_bytes_match_llama_quantize(exported, case, quant):
    tmp, out = exported
    files = out[case][2]
    reference = tmp / f"llama-{case}-{quant}.gguf"
    assert llama_quantize(files["f32"], reference, quant) == 0
    assert_same_file_contents(files[quant], reference, quant)


def test_uneven_experts_are_refused(tmp_path):
    vocab = make_bpe_tokenizer(tmp_path / "src", "qwen2")
    model = build_moe_model("qwen3moe", vocab, layers=3)
    src = tmp_path / "src"
    save_layout(model, src, "hub")
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    for suffix in ("gate_proj", "up_proj", "down_proj"):
        del state[f"model.layers.2.mlp.experts.7.{suffix}.weight"]
    state["model.layers.2.mlp.gate.weight"] = state["model.layers.2.mlp.gate.weight"][:7].contiguous()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    result = run("export", src, "--out", tmp_path / "out", "--pre", "qwen2", "-q", "f32", ok=False)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert "experts differ across blocks (blocks 0-1: 8; blocks 2: 7)" in line, line
    assert not list((tmp_path / "out").glob("*.gguf"))


def test_router_that_disagrees_with_the_experts_is_refused(tmp_path):
    vocab = make_bpe_tokenizer(tmp_path / "src", "qwen2")
    src = tmp_path / "src"
    save_layout(build_moe_model("qwen3moe", vocab, layers=1), src, "fused")
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    state["model.layers.0.mlp.gate.weight"] = state["model.layers.0.mlp.gate.weight"][:7].contiguous()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    result = run("export", src, "--out", tmp_path / "out", "--pre", "qwen2", "-q", "f32", ok=False)
    assert result.exit_code == 2
    assert "block 0: router 'model.layers.0.mlp.gate.weight' has shape [7, 256] but the block holds 8 experts" \
        in result.output


def test_gguf_imatrix_has_expert_entries_and_drives_iq_types(exported, tmp_path):
    """imatrix from the F32 GGUF through llama.cpp: one row and one count per expert for the
    stacked tensors (llama-imatrix's 3-D entries), and an IQ type quantizes with it exactly as
    llama.cpp's quantizer does with the same statistics."""
    from shortquant.quant.imatrix import read_imatrix

    tmp, out = exported
    _, src, files, _ = out["qwen3moe-experts-fused"]
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. Once upon a time there was a cat. " * 30)
    imatrix = tmp_path / "m.imatrix.gguf"
    run("imatrix", files["f32"], "--text", calib, "-o", imatrix, "--ctx", "64", "--chunks", "2")
    im = read_imatrix(imatrix)
    for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        name = f"blk.1.{kind}.weight"
        assert im.sums[name].shape == (6, 256) and im.counts[name].shape == (6,)
        # every token goes to 2 experts: the counts add up to twice the tokens evaluated
        assert im.counts[name].sum() == 2 * im.counts["blk.1.attn_q.weight"][0]
    assert im.counts["blk.1.ffn_down_exps.weight"].min() > 0
    dest = tmp_path / "iq"
    run("export", src, "--out", dest, "--pre", "qwen2", "-q", "iq4_xs", "--imatrix", imatrix)
    reference = tmp_path / "llama-iq4_xs.gguf"
    assert llama_quantize(files["f32"], reference, "iq4_xs", im.importance()) == 0
    assert_same_file_contents(next(dest.glob("*-IQ4_XS.gguf")), reference, "iq4_xs")


@pytest.mark.parametrize("case", ["qwen3moe-experts-gaps-stale", "mixtral-experts-hub"])
def test_folder_imatrix_matches_llama_cpps_expert_entries(exported, tmp_path, case):
    """imatrix from the Hugging Face folder (the torch model built from the tensors' own expert
    counts: stale num_experts, expert-index gaps) equals the one llama.cpp collects on our F32
    file: per-expert sums and counts of every stacked tensor, the router's too."""
    from shortquant.quant.imatrix import read_imatrix

    _, out = exported
    _, src, files, _ = out[case]
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. Once upon a time there was a cat. " * 30)
    folder, gguf_file = tmp_path / "folder.imatrix.gguf", tmp_path / "gguf.imatrix.gguf"
    run("imatrix", src, "--text", calib, "-o", folder, "--ctx", "64", "--chunks", "2")
    run("imatrix", files["f32"], "--text", calib, "-o", gguf_file, "--ctx", "64", "--chunks", "2")
    ours, theirs = read_imatrix(folder), read_imatrix(gguf_file)
    for n in range(4):
        for kind in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            name = f"blk.{n}.{kind}.weight"
            np.testing.assert_array_equal(ours.counts[name], theirs.counts[name])
            # llama.cpp's evaluation keeps K/V in f16: small sums move by ~1e-3 of the entry's mean
            np.testing.assert_allclose(ours.sums[name], theirs.sums[name], rtol=5e-3,
                                       atol=1e-3 * float(theirs.sums[name].mean()))
    assert ours.sums["blk.0.ffn_down_exps.weight"].shape == (6, 256)


def test_eval_against_the_pruned_hf_folder(exported):
    """eval --base FOLDER on an expert-pruned checkpoint with a stale num_experts and gaps: the
    torch model is the tensors' own, so the KLD of our F32 file against it is ~0."""
    import json

    _, out = exported
    _, src, files, _ = out["qwen3moe-experts-gaps-stale"]
    result = CliRunner().invoke(main, ["eval", str(files["f32"]), "--base", str(src), "--ctx", "64", "--chunks", "2",
                                       "--json", "--quiet", "--threads", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert 0 <= data["files"][0]["kld"]["mean"] < 1e-4


def test_optimize_refuses_experts_in_one_line(exported, tmp_path):
    _, out = exported
    src = out["qwen3moe-whole"][1]
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = run("export", src, "--out", tmp_path / "out", "--pre", "qwen2", "-q", "q4_k_m", "--optimize",
                 "--calib", calib, ok=False)
    assert result.exit_code == 2, result.output
    assert "--optimize does not handle mixture-of-experts models yet" in result.output
    assert not list((tmp_path / "out").glob("*.gguf"))
