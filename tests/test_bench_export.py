"""The benchmark's checkpoint writer (scripts/bench_export.py) writes what torch/safetensors read."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_export  # noqa: E402


def test_bf16_rounding_matches_torch():
    values = np.random.default_rng(1).standard_normal(100_000).astype(np.float32) * 0.02
    values[:4] = [0.0, -0.0, 1e-40, 3.0e38]  # zero signs, a subnormal, near the top of the range
    ours = bench_export.to_bf16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def test_safetensors_file_reads_back_with_hf_names(tmp_path):
    tensors = [("model.embed_tokens.weight", (300, 64)), ("model.norm.weight", (64,))]
    path = tmp_path / "model.safetensors"
    bench_export.write_safetensors_bf16(path, tensors, seed=3)
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(name for name, _ in tensors)
        embed, norm = f.get_tensor("model.embed_tokens.weight"), f.get_tensor("model.norm.weight")
    assert embed.dtype == torch.bfloat16 and tuple(embed.shape) == (300, 64)
    assert 0.015 < embed.float().std().item() < 0.025          # N(0, 0.02) like a LLaMA init
    assert abs(norm.float().mean().item() - 1.0) < 0.05         # norms near 1
    # the same seed writes the same bytes
    again = tmp_path / "again.safetensors"
    bench_export.write_safetensors_bf16(again, tensors, seed=3)
    assert again.read_bytes() == path.read_bytes()


def test_checkpoint_names_and_size_are_llama_7b_shaped():
    tensors = bench_export.checkpoint_tensors(4)
    n_params = sum(int(np.prod(shape)) for _, shape in tensors)
    assert 1.06e9 < n_params < 1.08e9                           # the 1.07 B parameters
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=4, **bench_export.LLAMA_7B)
    head_dim = config.hidden_size // config.num_attention_heads
    shapes = dict(tensors)
    assert shapes["model.layers.3.self_attn.k_proj.weight"] == (config.num_key_value_heads * head_dim,
                                                              config.hidden_size)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (config.hidden_size, config.intermediate_size)
    assert json.dumps(bench_export.LLAMA_7B)  # plain JSON for config.json
