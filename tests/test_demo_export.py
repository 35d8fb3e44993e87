"""The embedded demo model: `shortquant export` with no source, loaded by llama.cpp.

Greedy text from the exported f16 and q8_0 files is the same as transformers gives for the
checkpoint itself.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from llama_eval import gguf_greedy, gguf_logits, hf_greedy, hf_logits
from shortquant import keys
from shortquant.cli import main
from shortquant.recipes import load_recipe
from shortquant.resources import demo_model

DEMO_MODEL = demo_model()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import torch
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(main, ["export", "--quant", "f16", "--quant", "q8_0", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    model = LlamaForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    files = {p.name.rsplit("-", 1)[1].removesuffix(".gguf").lower(): p for p in out.glob("*.gguf")}
    return model, files


def prompt_tokens():
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(DEMO_MODEL / "tokenizer.model"))
    return [sp.bos_id(), *sp.encode("Once upon a time")]


def test_demo_greedy_text_matches_transformers(demo):
    model, files = demo
    prompt = prompt_tokens()
    expected = hf_greedy(model, prompt, 32)
    for quant in ("f16", "q8_0"):
        assert gguf_greedy(files[quant], prompt, 32) == expected, quant


def test_demo_logits_close_and_provenance(demo):
    model, files = demo
    tokens = prompt_tokens() + [5, 60, 200, 300, 7]
    ref = hf_logits(model, tokens)
    err = np.abs(gguf_logits(files["f16"], tokens) - ref).max() / np.abs(ref).max()
    assert err < 0.01
    recipe = load_recipe("shortquant-demo")
    reader = gguf.GGUFReader(files["q8_0"])
    assert reader.get_field(keys.SOURCE_BLOCKS).contents() == list(recipe.kept_blocks)
    assert reader.get_field(keys.SOURCE_BLOCK_COUNT).contents() == recipe.pruning.source_block_count
    assert files["q8_0"].name.startswith(f"{recipe.basename}-")


def test_demo_kld_orders_the_ladder(tmp_path):
    """On the demo (widths 256/768, so real K-quants): KLD q2_k > q4_k_m > q8_0 > 0 against f32."""
    from shortquant.evaluate.runner import evaluate_files

    out = tmp_path / "ladder"
    args = ["export", "--out", str(out), "--quiet"]
    for quant in ("f32", "q8_0", "q4_k_m", "q2_k"):
        args += ["--quant", quant]
    assert CliRunner().invoke(main, args).exit_code == 0
    files = {p.name.rsplit("-", 1)[1].removesuffix(".gguf").lower(): p for p in out.glob("*.gguf")}
    results = evaluate_files([files[q] for q in ("q8_0", "q4_k_m", "q2_k")], None, 128, files["f32"],
                             threads=1, n_chunks=8, cache_dir=tmp_path / "cache")
    kld = {r["type"].lower(): r["kld"]["mean"] for r in results["files"]}
    assert kld["q2_k"] > kld["q4_k_m"] > kld["q8_0"] > 0, kld


def test_split_export_loads_with_same_logits(tmp_path, demo):
    _, files = demo
    out = tmp_path / "split"
    result = CliRunner().invoke(main, ["export", "--quant", "f16", "--out", str(out), "--quiet",
                                       "--split-max-size", "4M"])
    assert result.exit_code == 0, result.output
    parts = sorted(out.glob("*.gguf"))
    assert len(parts) == 3 and parts[0].name.endswith("-F16-00001-of-00003.gguf")
    tokens = prompt_tokens() + [5, 60, 200]
    assert np.array_equal(gguf_logits(parts[0], tokens), gguf_logits(files["f16"], tokens))


def test_one_failed_type_leaves_the_others(tmp_path, monkeypatch):
    """A ladder where one type fails mid-way: the others are finished, the failure is named."""
    import shortquant.ggml as ggml
    from shortquant.errors import QuantError

    real = ggml.quantize

    def failing_q4_k(data, qtype, *args, **kwargs):
        if qtype == gguf.GGMLQuantizationType.Q4_K:
            raise QuantError("simulated kernel failure")
        return real(data, qtype, *args, **kwargs)

    monkeypatch.setattr(ggml, "quantize", failing_q4_k)
    out = tmp_path / "ladder"
    result = CliRunner().invoke(main, ["export", "--quant", "q8_0", "--quant", "q4_k_m", "--quant", "q6_k",
                                       "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    assert "q4_k_m failed:" in result.stderr and "simulated kernel failure" in result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["Shortquant-Demo-5.0M-stories-Q8_0.gguf", "Shortquant-Demo-5.0M-stories-Q6_K.gguf"])
    for name in names:
        assert gguf_greedy(out / name, prompt_tokens(), 4)


def test_export_eval_and_card_in_one_run(tmp_path):
    """`export ... --eval --card`: results.json, a plot and a card that shows the measurements."""
    import json

    out = tmp_path / "pub"
    result = CliRunner().invoke(main, ["export", "-q", "f16", "-q", "q8_0", "--eval", "--ctx", "128", "--card",
                                       "--threads", "1", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    by_type = {f["type"]: f for f in results["files"]}
    assert set(by_type) == {"F16", "Q8_0"}
    assert by_type["F16"]["kld"]["same_top1"] == 1.0             # the base against itself
    assert 0 < by_type["Q8_0"]["kld"]["mean"] < 0.01
    assert by_type["Q8_0"]["ppl"] > 1 and by_type["Q8_0"]["speed"]["tg128"]["mean"] > 0
    card = (out / "README.md").read_text()
    assert "report.png" in card and f"{by_type['Q8_0']['ppl']:.4f}" in card
    assert (out / "report.png").stat().st_size > 0
