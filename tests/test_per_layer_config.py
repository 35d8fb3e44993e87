"""transformers' ``per_layer_config`` (heterogeneous models): read as one more description of each
block's shapes, checked against the tensors, the model written as llama.cpp's ``deci``."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

import pruned
from llama_eval import gguf_logits, hf_logits
from shortquant.cli import main

TOKENS = [1, 17, 250, 3, 99, 311, 7, 128, 300, 45, 6, 2, 77, 200, 31, 260, 12, 9, 140, 88]
DECLARED = {"1": {"num_attention_heads": 2, "num_key_value_heads": 1}, "2": {"intermediate_size": 384},
            "3": {"skip": ["mlp"]}}


def heterogeneous(folder, declared):
    model = pruned.base_model(4, seed=5)
    layers = model.model.layers
    pruned.keep_heads(layers[1].self_attn, [0, 1], [0])
    pruned.keep_channels(layers[2].mlp, 384, 1)
    pruned.drop_mlp(layers[3])
    return model, pruned.save(model, folder, per_layer_config=declared)


def export(src, out):
    return CliRunner().invoke(main, ["export", str(src), "--out", str(out), "-q", "f32", "--quiet"])


def test_per_layer_config_is_written_as_deci_and_runs_as_transformers(tmp_path):
    model, src = heterogeneous(tmp_path / "src", DECLARED)
    result = export(src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    path = next((tmp_path / "out").glob("*.gguf"))
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "deci"
    assert reader.get_field("deci.attention.head_count").contents() == [4, 2, 4, 4]
    ref, got = hf_logits(model, TOKENS), gguf_logits(path, TOKENS)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("declared, message", [
    ({**DECLARED, "2": {"intermediate_size": 256}},
     "block 2: per_layer_config says heads 4/2, ffn 256 but its tensors hold heads 4/2, ffn 384"),
    ({k: v for k, v in DECLARED.items() if k != "3"},
     "block 3: per_layer_config says heads 4/2, ffn 512 but its tensors hold heads 4/2, no MLP"),
    ({**DECLARED, "9": {"intermediate_size": 256}}, "per_layer_config names layer 9 but the config has 4"),
    ({**DECLARED, "0": {"sliding_window": 64}}, "per_layer_config[0] sets 'sliding_window'"),
])
def test_per_layer_config_that_disagrees_with_the_tensors_is_refused(tmp_path, declared, message):
    _, src = heterogeneous(tmp_path / "src", declared)
    result = export(src, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output
