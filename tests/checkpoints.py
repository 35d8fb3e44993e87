"""Builders of tiny Hugging Face LLaMA checkpoints for the tests.

Each builder makes a randomly initialised ``LlamaForCausalLM`` with transformers, saves it
to a folder, and can then rewrite the saved weights into the layouts pruning tools leave
behind (gapped block indices, a stale ``num_hidden_layers``, ``.bin`` files, shards).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
# Every skip for a missing ../shared file says this, so conftest can count them in one line.
SHARED_SKIP = "needs ../shared/fixtures/"


def shared_fixture(name: str) -> Path:
    """A file from ../shared/fixtures (ones we may not redistribute); skips the test without it."""
    import pytest

    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"{SHARED_SKIP}{name}")
    return path


@dataclass
class TinySpec:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)


def build_model(spec: TinySpec):
    """A random LlamaForCausalLM in f32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    kwargs = dict(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        vocab_size=spec.vocab_size,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        **spec.extra,
    )
    if spec.head_dim is not None:
        kwargs["head_dim"] = spec.head_dim
    config = LlamaConfig(**kwargs)
    model = LlamaForCausalLM(config).float().eval()
    # Random init leaves norms at 1.0; perturb them so a wrong norm mapping shows in logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_model(model, folder: Path, *, safe: bool = True, max_shard_size: str | None = None,
               tokenizer_model: Path | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    if not safe:
        safetensors_to_bin(folder)
    if tokenizer_model is not None:
        shutil.copy(tokenizer_model, folder / "tokenizer.model")
    return folder


def safetensors_to_bin(folder: Path) -> None:
    """Rewrite a saved checkpoint as PyTorch .bin files (transformers 5 only saves safetensors)."""
    from safetensors.torch import load_file

    def bin_name(name: str) -> str:
        return "pytorch_" + name.replace(".safetensors", ".bin")

    for path in sorted(folder.glob("*.safetensors")):
        torch.save(load_file(str(path)), folder / bin_name(path.name))
        path.unlink()
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: bin_name(v) for k, v in data["weight_map"].items()}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(data, indent=2))
        index.unlink()


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def rename_layers(folder: Path, mapping: dict[int, int]) -> None:
    """Rewrite every saved weight file so block ``i`` is stored as block ``mapping[i]``.

    Used to make 'original indices kept, with gaps' checkpoints out of a contiguous one.
    Index files are rewritten to match.
    """
    import re

    pattern = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")

    def new_name(name: str) -> str:
        m = pattern.match(name)
        return f"{m.group(1)}{mapping[int(m.group(2))]}{m.group(3)}" if m else name

    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file, save_file

            tensors = load_file(str(path))
            save_file({new_name(k): v.contiguous() for k, v in tensors.items()}, str(path),
                      metadata={"format": "pt"})
        else:
            tensors = torch.load(path, weights_only=True)
            torch.save({new_name(k): v for k, v in tensors.items()}, path)
    for index in folder.glob("*.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"] = {new_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))
