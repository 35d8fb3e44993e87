"""Helpers for the reliability tests: a checkpoint big enough to interrupt, the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-c", "from shortquant.cli import main; main()"]


def write_llama_checkpoint(folder: Path, tokenizer_model: Path, *, hidden: int = 1024, intermediate: int = 2816,
                           layers: int = 4, heads: int = 8, vocab: int = 512, seed: int = 0,
                           readme: str | None = None) -> Path:
    """A random LLaMA checkpoint written straight from numpy (seconds, where transformers'
    init of the same 52 M parameters takes twenty)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "lm_head.weight": w(vocab, hidden),
               "model.norm.weight": np.ones(hidden, np.float16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(hidden, hidden),
                        p + "self_attn.v_proj.weight": w(hidden, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
                        p + "mlp.gate_proj.weight": w(intermediate, hidden), p + "mlp.up_proj.weight": w(intermediate, hidden),
                        p + "mlp.down_proj.weight": w(hidden, intermediate),
                        p + "input_layernorm.weight": np.ones(hidden, np.float16),
                        p + "post_attention_layernorm.weight": np.ones(hidden, np.float16)})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 256, "tie_word_embeddings": False, "bos_token_id": 1,
              "eos_token_id": 2, "torch_dtype": "float16", "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder


def start_export(src: Path, out: Path, *quants: str, extra=(), **popen) -> subprocess.Popen:
    args = [*CLI, "export", str(src), "--out", str(out), "--quiet"]
    for q in quants:
        args += ["-q", q]
    return subprocess.Popen([*args, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def leftovers(out: Path) -> list[str]:
    """GGUF and partial files in ``out`` (what a clean interruption must not leave)."""
    if not out.exists():
        return []
    return sorted(p.name for p in out.iterdir() if p.name.endswith((".gguf", ".part")))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def env_without_debug() -> dict:
    env = dict(os.environ)
    env.pop("SHORTQUANT_DEBUG", None)
    return env
