"""The embedded demo model in models/demo/: a trained, depth-pruned LLaMA that loads and talks.

Made by scripts/make_demo_model.py; these tests check what was committed, not the script.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from checkpoints import shared_fixture
from shortquant.resources import demo_model, recipes_dir

REPO = Path(__file__).resolve().parents[1]
DEMO = demo_model()
RECIPE = recipes_dir() / "shortquant-demo.json"
BOS, EOS = 1, 2

# Strings where sentencepiece tokenizers tend to disagree: spaces, newlines, digits, unicode
# (byte fallback), text that looks like special tokens.
HARD_STRINGS = [
    "Once upon a time, there was a little girl named Lily.",
    "  two leading spaces",
    " one leading space",
    "trailing spaces   ",
    "a  b   c",
    "line one\nline two\n\n\ttabbed",
    "héllo ünïcode 日本語 🙂 ©",
    "12345 digits 3.14 and 2024",
    "<s> not special </s> <unk>",
    'Lily said, "Let\'s play!" She smiled.',
    "",
]


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(DEMO / "tokenizer.model"))


def test_checkpoint_is_small_and_complete():
    names = {p.name for p in DEMO.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "generation_config.json"} <= names
    total = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert total < 20 * 1024 * 1024


def test_config_shape_and_weights_agree():
    from safetensors import safe_open

    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 6
    assert (config["hidden_size"], config["intermediate_size"]) == (256, 768)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 4)
    assert config["vocab_size"] == 512 and config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"]) == (BOS, EOS)

    with safe_open(str(DEMO / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    assert blocks == set(range(6)), "blocks must be renumbered contiguously 0..5"
    assert "lm_head.weight" in keys  # untied embeddings
    assert dtypes <= {"F16", "BF16"}


def test_recipe_records_the_pruning():
    recipe = json.loads(RECIPE.read_text())
    config = json.loads((DEMO / "config.json").read_text())
    pruning = recipe["pruning"]
    assert recipe["name"] == "shortquant-demo" and recipe["license"] == "mit"
    assert recipe["hub_id"] is None and recipe["base_model"] is None
    assert recipe["chat_template"] is None
    assert pruning["unit"] == "block" and pruning["source_block_count"] == 8
    removed = pruning["removed_blocks"]
    assert len(removed) == 2 and len(set(removed)) == 2
    assert all(0 <= i < pruning["source_block_count"] for i in removed)
    assert pruning["source_block_count"] - len(removed) == config["num_hidden_layers"]
    assert (REPO / recipe["source"]).is_file()


def test_tokenizer_config():
    config = json.loads((DEMO / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")
    assert "chat_template" not in config


def test_greedy_text_is_a_story(model, sp):
    ids = torch.tensor([[BOS] + sp.encode("Once upon a time")])
    out = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=EOS)
    text = sp.decode(out[0, 1:].tolist())
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text
    words = re.findall(r"[A-Za-z']+", text)
    assert len(words) >= 15


def test_pruned_model_predicts_held_out_style_text(model, sp):
    """Next-token perplexity on a plain story is low (an untrained model scores ~512)."""
    story = ("One day, a little boy named Tim went to the park with his mom. He saw a big red ball. "
             "Tim wanted to play with the ball. He ran to the ball and kicked it. The ball went up "
             "high in the sky. Tim was very happy.")
    ids = torch.tensor([[BOS] + sp.encode(story) + [EOS]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.exp(loss).item() < 12


def test_tokenizer_pieces_equal_the_gguf_vocabulary(sp):
    """Provenance: the vocabulary is stories260K's, piece for piece (needs that file)."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(shared_fixture("stories260K.gguf")))
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST).contents()
    scores = reader.get_field(gguf.Keys.Tokenizer.SCORES).contents()
    types = reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE).contents()
    assert sp.get_piece_size() == len(tokens) == 512
    assert [sp.id_to_piece(i) for i in range(512)] == tokens
    assert [sp.get_score(i) for i in range(512)] == pytest.approx(scores)
    assert [i for i in range(512) if sp.is_byte(i)] == \
        [i for i, t in enumerate(types) if t == gguf.TokenType.BYTE]
    assert [i for i in range(512) if sp.is_control(i)] == \
        [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, BOS, EOS)


def test_tokenizer_splits_like_llama_cpp(sp, demo_gguf):
    """sentencepiece on tokenizer.model and llama.cpp on the exported GGUF split alike."""
    llama_cpp = pytest.importorskip("llama_cpp")
    reference = llama_cpp.Llama(str(demo_gguf), vocab_only=True, verbose=False)
    for text in HARD_STRINGS:
        ours = sp.encode(text)
        theirs = reference.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert ours == theirs, text
        assert sp.decode(ours) == text
