"""Every family end to end: Llama-3 (llama3 rope scaling, explicit head_dim, tied), Qwen2 (biases,
tied), Qwen3 (q/k norms), Mistral (sentencepiece), each contiguous and pruned (gaps + a stale
config), against transformers' logits, greedy text, llama.cpp's quantizer and chat rendering.
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from checkpoints import edit_config, rename_layers
from conftest import DEMO_TOKENIZER
from families import STYLES, build_family_model, make_bpe_tokenizer
from llama_eval import gguf_greedy, gguf_logits, hf_greedy, hf_logits
from shortquant import keys
from shortquant.cli import main
from test_export_parity import assert_same_file_contents
from test_quant_parity import llama_quantize

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                    "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
WIDTHS = dict(hidden_size=256, intermediate_size=512)   # multiples of 256: K-quants apply

CASES = {
    # name: (transformers family, tokenizer style or "spm", config overrides, GGUF arch)
    "llama3-rope-head_dim": ("llama", "llama3", dict(head_dim=128, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
                             "llama"),
    "llama3.2-tied": ("llama", "llama3", dict(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE), "llama"),
    "qwen2-bias-tied": ("qwen2", "qwen2", dict(tie_word_embeddings=True), "qwen2"),
    "qwen3-head_dim": ("qwen3", "qwen2", dict(head_dim=128), "qwen3"),
    "mistral": ("mistral", "spm", dict(), "llama"),
}
LAYOUTS = {"contiguous": None, "pruned": [0, 2, 3, 6]}   # pruned: gaps, config still counting 8
TOKENS = [1, 17, 250, 3, 99, 311, 7, 128, 300, 45, 6, 2, 77, 200, 31, 260, 12, 9, 140, 88]
PROMPT = [1, 17, 250]


def run(*args):
    result = CliRunner().invoke(main, [*map(str, args), "--quiet"])
    assert result.exit_code == 0, result.output
    return result


def make_case(tmp, case: str, layout: str):
    family, style, overrides, _ = CASES[case]
    src = tmp / f"{case}-{layout}"
    if style == "spm":
        src.mkdir(parents=True)
        shutil.copy(DEMO_TOKENIZER, src / "tokenizer.model")
        (src / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "LlamaTokenizer",
             "chat_template": MISTRAL_TEMPLATE}))
        vocab = 512
    else:
        vocab = make_bpe_tokenizer(src, style)
    model = build_family_model(family, vocab, **WIDTHS, **overrides)
    model.save_pretrained(src)
    if LAYOUTS[layout] is not None:
        rename_layers(src, dict(enumerate(LAYOUTS[layout])))
        edit_config(src, num_hidden_layers=8)
    pre = [] if style == "spm" else ["--pre", STYLES[style][5]]
    return model, src, pre


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case and layout exported once (f32, and q8_0 + q4_k_m for the contiguous layout)."""
    tmp = tmp_path_factory.mktemp("families")
    out = {}
    for case in CASES:
        for layout in LAYOUTS:
            model, src, pre = make_case(tmp, case, layout)
            quants = ["f32", "q8_0", "q4_k_m"] if layout == "contiguous" else ["f32"]
            dest = tmp / "out" / f"{case}-{layout}"
            run("export", src, "--out", dest, *pre, *(a for q in quants for a in ("-q", q)))
            files = {q: next(dest.glob(f"*-{q.upper()}.gguf")) for q in quants}
            out[case, layout] = (model, src, files)
    return tmp, out


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_f32_logits_and_greedy_match_transformers(exported, case, layout):
    _, out = exported
    model, _, files = out[case, layout]
    path = files["f32"]
    reader = gguf.GGUFReader(path)
    arch = CASES[case][3]
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.block_count") == 4
    assert field(reader, keys.SOURCE_BLOCKS) == LAYOUTS[layout]
    assert field(reader, keys.SOURCE_BLOCK_COUNT) == (8 if layout == "pruned" else None)
    ref, got = hf_logits(model, TOKENS), gguf_logits(path, TOKENS)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 1e-3 * scale, (np.abs(got - ref).max(), scale)
    assert gguf_greedy(path, PROMPT, 16) == hf_greedy(model, PROMPT, 16)


def test_family_specific_tensors_and_keys(exported):
    _, out = exported
    names = {case: {t.name for t in gguf.GGUFReader(files["f32"]).tensors}
             for (case, layout), (_, _, files) in out.items() if layout == "contiguous"}
    assert "rope_freqs.weight" in names["llama3-rope-head_dim"]
    assert "rope_freqs.weight" not in names["mistral"]
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names["qwen2-bias-tied"]
    assert "output.weight" not in names["qwen2-bias-tied"] and "output.weight" not in names["llama3.2-tied"]
    assert {"blk.3.attn_q_norm.weight", "blk.3.attn_k_norm.weight"} <= names["qwen3-head_dim"]
    reader = gguf.GGUFReader(out["llama3-rope-head_dim", "contiguous"][2]["f32"])
    assert field(reader, "llama.attention.key_length") == 128
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    assert factors.shape == (64,) and factors.min() == 1.0 and factors.max() == 8.0   # both ends and a blend
    assert ((factors > 1) & (factors < 8)).any()


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("case", list(CASES))
def test_quantized_bytes_match_llama_quantize(exported, case, quant):
    tmp, out = exported
    _, _, files = out[case, "contiguous"]
    reference = tmp / f"llama-{case}-{quant}.gguf"
    assert llama_quantize(files["f32"], reference, quant) == 0
    assert_same_file_contents(files[quant], reference, quant)


@pytest.mark.parametrize("case", list(CASES))
def test_chat_template_renders_as_transformers(exported, case):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    _, out = exported
    _, src, files = out[case, "contiguous"]
    reader = gguf.GGUFReader(files["f32"])
    tokens = field(reader, "tokenizer.ggml.tokens")
    template = field(reader, "tokenizer.chat_template")
    bos = tokens[field(reader, "tokenizer.ggml.bos_token_id")] if field(reader, "tokenizer.ggml.bos_token_id") \
        is not None else ""
    eos = tokens[field(reader, "tokenizer.ggml.eos_token_id")]
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi, how can I help?"},
                {"role": "user", "content": "Tell me a story."}]
    ours = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=messages).prompt   # adds the generation prompt
    theirs = AutoTokenizer.from_pretrained(src).apply_chat_template(messages, tokenize=False,
                                                                    add_generation_prompt=True)
    assert ours == theirs


@pytest.mark.parametrize("style", list(STYLES))
def test_small_bpe_tokenizes_as_hugging_face(tmp_path, style):
    """llama.cpp's named pre-tokenizer + our vocabulary and merges = the tokenizers library."""
    import llama_cpp
    from tokenizers import Tokenizer

    src = tmp_path / "src"
    vocab = make_bpe_tokenizer(src, style)
    family = "llama" if style == "llama3" else "qwen2"
    build_family_model(family, vocab, layers=1, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1).save_pretrained(src)
    run("export", src, "--out", tmp_path / "out", "--pre", STYLES[style][5], "-q", "f16")
    path = next((tmp_path / "out").glob("*.gguf"))
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    hf = Tokenizer.from_file(str(src / "tokenizer.json"))
    texts = ["Once upon a time, there was a little girl.", "  two  spaces and\ttabs\n\nnew lines",
             "numbers 1 12 123 1234 12345 and 3.14", "don't I'll we've THEY'RE", "émigré café naïve 日本語 🦙",
             "<|im_start|> is plain text here", ""]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            hf.encode(text, add_special_tokens=False).ids, text


def test_bpe_family_imatrix_and_eval_against_transformers(tmp_path):
    """A Qwen2 model with a BPE tokenizer through the HF-side stages: the torch imatrix (tokenized
    with tokenizer.json) covers every block matrix and drives an IQ type; KLD of the f32 file
    against the Hugging Face model itself is ~0."""
    import json as json_

    src = tmp_path / "src"
    vocab = make_bpe_tokenizer(src, "qwen2")
    build_family_model("qwen2", vocab, layers=2, hidden_size=256, intermediate_size=512).save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    imatrix = tmp_path / "m.imatrix.gguf"
    run("imatrix", src, "--text", calib, "-o", imatrix, "--ctx", "64", "--chunks", "2")
    names = {t.name for t in gguf.GGUFReader(imatrix).tensors}
    for block in (0, 1):
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert f"blk.{block}.{kind}.weight.in_sum2" in names
    out = tmp_path / "out"
    run("export", src, "--out", out, "--pre", "qwen2", "-q", "f32", "-q", "iq3_xxs", "--imatrix", imatrix)
    f32 = next(out.glob("*-F32.gguf"))
    result = CliRunner().invoke(main, ["eval", str(f32), "--base", str(src), "--ctx", "64", "--chunks", "2",
                                       "--json", "--quiet", "--threads", "2"])
    assert result.exit_code == 0, result.output
    data = json_.loads(result.output[result.output.index("{"):])
    kld = data["files"][0]["kld"]["mean"]
    assert 0 <= kld < 1e-4


@pytest.mark.parametrize("case, marker", [("llama3.2-tied", "<|start_header_id|>user<|end_header_id|>"),
                                          ("qwen2-bias-tied", "<|im_start|>user\n{prompt}<|im_end|>")])
def test_card_shows_the_family_prompt(exported, case, marker):
    _, out = exported
    folder = out[case, "contiguous"][2]["f32"].parent
    run("card", folder)
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert marker in text and "## Prompt template" in text
    assert f"- {CASES[case][3]}" in text   # the architecture is a hub tag
