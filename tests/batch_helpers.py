"""Catalogues for the batch tests: tiny transformers checkpoints (one broken on purpose) and the
demo model, written as jobs files."""

from __future__ import annotations

from pathlib import Path

import torch

from checkpoints import TinySpec, build_model, rename_layers, save_model

INIT = {"initializer_range": 0.05}


def make_checkpoints(root: Path, tokenizer: tuple[Path, int]) -> dict[str, Path]:
    """Three tiny checkpoints: ``tiny-a`` (safetensors), ``tiny-b`` (.bin, original block indices
    kept with gaps) and ``tiny-nan`` (a NaN in one weight: its export must fail)."""
    tok_path, vocab = tokenizer
    out = {}
    a = build_model(TinySpec(num_hidden_layers=3, vocab_size=vocab, seed=1, extra=dict(INIT)))
    out["tiny-a"] = save_model(a, root / "tiny-a", tokenizer_model=tok_path)
    b = build_model(TinySpec(num_hidden_layers=4, vocab_size=vocab, seed=2, extra=dict(INIT)))
    out["tiny-b"] = save_model(b, root / "tiny-b", safe=False, tokenizer_model=tok_path)
    rename_layers(out["tiny-b"], {0: 0, 1: 2, 2: 3, 3: 5})
    bad = build_model(TinySpec(num_hidden_layers=2, vocab_size=vocab, seed=3, extra=dict(INIT)))
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    out["tiny-nan"] = save_model(bad, root / "tiny-nan", tokenizer_model=tok_path)
    return out


def write_jobs(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def gguf_bytes(folder: Path) -> dict[str, bytes]:
    """Every GGUF file under ``folder``, by path relative to it."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.gguf"))}
