"""The checkpoint layouts and families of issue 20, each a builder that saves a tiny checkpoint in a
folder and returns the extra ``export`` options it needs (tests/test_one_reader.py and
scripts/reader_matrix.py use them)."""

from __future__ import annotations

import shutil

import torch

import pruned
from checkpoints import TinySpec, build_model, edit_config, rename_layers, save_model
from conftest import DEMO_TOKENIZER
from families import EVAL_TEXT, STYLES, build_family_model, make_bpe_tokenizer

# special-token texts stay text in llama.cpp's tokenizer (parse_special=false): so must they in ours
TEXT = "<s> A note </s> with <|endoftext|> in it.\n" + EVAL_TEXT.read_text(encoding="utf-8")[:2500]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def llama(folder, *, layers=4, gaps=None, config_layers=None, safe=True, shard=None, dtype=None):
    """A tiny LLaMA (sentencepiece tokenizer) saved in one of export's layouts."""
    model = build_model(TinySpec(num_hidden_layers=layers, vocab_size=512, extra={"initializer_range": 0.05}))
    save_model(model.to(dtype) if dtype else model, folder, safe=safe, max_shard_size=shard,
               tokenizer_model=DEMO_TOKENIZER)
    if gaps is not None:
        rename_layers(folder, dict(enumerate(gaps)))
    if config_layers is not None:
        edit_config(folder, num_hidden_layers=config_layers)
    return []


def family(folder, name, style, gaps, **overrides):
    """A family's tiny model stored with gaps and a config still counting the unpruned blocks."""
    if style == "spm":
        folder.mkdir(parents=True)
        shutil.copy(DEMO_TOKENIZER, folder / "tokenizer.model")
        vocab = 512
    else:
        vocab = make_bpe_tokenizer(folder, style)
    model = build_family_model(name, vocab, layers=len(gaps), **overrides)
    model.save_pretrained(folder)
    rename_layers(folder, dict(enumerate(gaps)))
    edit_config(folder, num_hidden_layers=gaps[-1] + 2)
    return [] if style == "spm" else ["--pre", STYLES[style][5]]


def pruned_layout(build):
    def make(folder):
        build(folder)
        return []
    return make


CASES = {
    "contiguous": lambda f: llama(f),
    "gaps": lambda f: llama(f, gaps=[0, 1, 3, 4]),                                  # config still says 4
    "stale-num_hidden_layers": lambda f: llama(f, config_layers=5),                 # ShortGPT / SLEB save
    "sharded-bin-gaps": lambda f: llama(f, safe=False, shard="100KB", gaps=[0, 2, 5, 7], config_layers=8),
    "sharded-bf16-safetensors": lambda f: llama(f, shard="100KB", dtype=torch.bfloat16, gaps=[1, 2, 4, 5]),
    "width-pruned-llm-pruner": pruned_layout(pruned.llm_pruner),
    "width-pruned-flap-biases": pruned_layout(pruned.flap),
    "width-pruned-uniform-stale": pruned_layout(pruned.uniform_stale),
    "attention-mlp-dropped": pruned_layout(pruned.llm_drop),
    "decilm": pruned_layout(pruned.decilm),
    "llama3-gaps": lambda f: family(f, "llama", "llama3", [0, 2, 3], rope_scaling=LLAMA3_ROPE,
                                    rope_theta=500000.0),
    "qwen2-gaps-tied": lambda f: family(f, "qwen2", "qwen2", [0, 2, 3], tie_word_embeddings=True),
    "qwen3-gaps-head_dim": lambda f: family(f, "qwen3", "qwen2", [1, 2, 4], head_dim=32),
    "mistral-gaps": lambda f: family(f, "mistral", "spm", [0, 1, 3]),
}
