"""Bad input: one line naming the file and the problem, exit code 2, no traceback, nothing left."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from checkpoints import TinySpec, build_model, save_model
from shortquant.cli import main


@pytest.fixture(scope="module")
def tiny_model(small_tokenizer):
    return build_model(TinySpec(num_hidden_layers=2, vocab_size=small_tokenizer[1]))


@pytest.fixture()
def src(tmp_path, tiny_model, small_tokenizer):
    return save_model(tiny_model, tmp_path / "src", tokenizer_model=small_tokenizer[0])


def run_export(src, out, *extra):
    return CliRunner().invoke(main, ["export", str(src), "--out", str(out), "--quiet", *extra])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_nothing_written(out):
    leftovers = list(out.glob("*")) if out.exists() else []
    assert not [p for p in leftovers if p.suffix in (".gguf", ".part")], leftovers


def test_missing_config(tmp_path, src):
    (src / "config.json").unlink()
    assert_one_line_error(run_export(src, tmp_path / "o"), str(src), "missing config.json")


def test_non_json_config(tmp_path, src):
    (src / "config.json").write_text("{ not json")
    assert_one_line_error(run_export(src, tmp_path / "o"), "config.json", "not valid JSON")


def test_unsupported_architecture(tmp_path, src):
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_export(src, tmp_path / "o"), "unsupported architecture GPT2LMHeadModel",
                          "LlamaForCausalLM")


def test_truncated_safetensors(tmp_path, src):
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    assert_one_line_error(run_export(src, tmp_path / "o"), "model.safetensors", "truncated safetensors")


def test_corrupt_safetensors_header(tmp_path, src):
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + 20] = b"#" * 20
    path.write_bytes(bytes(data))
    assert_one_line_error(run_export(src, tmp_path / "o"), "model.safetensors", "corrupt safetensors header")


def test_huge_header_length(tmp_path, src):
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 60)
    path.write_bytes(bytes(data))
    assert_one_line_error(run_export(src, tmp_path / "o"), "corrupt safetensors header")


def sharded(tmp_path, tiny_model, small_tokenizer):
    tok, _ = small_tokenizer
    return save_model(tiny_model, tmp_path / "sharded", max_shard_size="100KB", tokenizer_model=tok)


def test_missing_shard(tmp_path, tiny_model, small_tokenizer):
    src = sharded(tmp_path, tiny_model, small_tokenizer)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert_one_line_error(run_export(src, tmp_path / "o"), "model.safetensors.index.json",
                          f"shard {shard.name} named in the index is missing")


def test_index_entry_outside_folder(tmp_path, tiny_model, small_tokenizer):
    src = sharded(tmp_path, tiny_model, small_tokenizer)
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "../../etc/passwd"
    index.write_text(json.dumps(data))
    assert_one_line_error(run_export(src, tmp_path / "o"), "points outside the checkpoint folder")


def test_shape_contradicts_config(tmp_path, src):
    config = json.loads((src / "config.json").read_text())
    config["hidden_size"] = 96      # (a stale intermediate_size is followed: width-pruned models keep theirs)
    (src / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_export(src, tmp_path / "o"), "model.embed_tokens.weight", ", 96] was expected")


def nan_checkpoint(tmp_path, tiny_model, small_tokenizer):
    import copy

    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = math.nan
        model.model.layers[1].mlp.up_proj.weight[4, 5] = math.inf
    return save_model(model, tmp_path / "nan", tokenizer_model=small_tokenizer[0])


def test_nonfinite_weights_refused_unless_allowed(tmp_path, tiny_model, small_tokenizer):
    src = nan_checkpoint(tmp_path, tiny_model, small_tokenizer)
    out = tmp_path / "o"
    assert_one_line_error(run_export(src, out, "--quant", "f16", "--quant", "q8_0"),
                          "model.layers.1.mlp.up_proj.weight", "2 NaN/Inf values", "--allow-nonfinite")
    assert_nothing_written(out)
    allowed = run_export(src, out, "--quant", "f16", "--allow-nonfinite")
    assert allowed.exit_code == 0, allowed.output
    assert len(list(out.glob("*.gguf"))) == 1


def test_bin_with_pickled_code_is_refused(tmp_path, tiny_model, small_tokenizer):
    src = tmp_path / "pickled"
    save_model(tiny_model, src, safe=False, tokenizer_model=small_tokenizer[0])
    torch.save(tiny_model, src / "pytorch_model.bin")  # a whole pickled model, like LLM-Pruner's
    assert_one_line_error(run_export(src, tmp_path / "o"), "pytorch_model.bin", "refusing to unpickle code")


def test_garbage_tokenizer(tmp_path, src):
    (src / "tokenizer.model").write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(run_export(src, tmp_path / "o"), "tokenizer.model")


def test_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_export(empty, tmp_path / "o"), str(empty), "empty folder")


def test_output_folder_not_writable(tmp_path, src):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    assert_one_line_error(run_export(src, blocker), str(blocker), "not a folder")
    assert_one_line_error(run_export(src, blocker / "sub"), "output folder is not writable")


def test_block_missing_a_tensor(tmp_path, src):
    from safetensors.torch import load_file, save_file

    path = src / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert_one_line_error(run_export(src, tmp_path / "o"), "block 1 is missing tensor 'self_attn.v_proj.weight'")


def test_duplicate_block_index(tmp_path, src):
    from safetensors.torch import load_file, save_file

    path = src / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.01.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert_one_line_error(run_export(src, tmp_path / "o"), "block 1 has tensor 'mlp.up_proj.weight' twice")


def test_unknown_quant_type(tmp_path, src):
    assert_one_line_error(run_export(src, tmp_path / "o", "--quant", "q9_9"), "unknown quantization type",
                          "q4_k_m")


def write_imatrix_for(path, entries):
    from shortquant.quant.imatrix import Imatrix, write_imatrix

    sums = {name: np.asarray(values, dtype=np.float32).reshape(1, -1) for name, values in entries.items()}
    counts = {name: np.array([64.0], dtype=np.float32) for name in entries}
    write_imatrix(path, Imatrix(sums, counts, datasets=["test"], chunk_count=1, chunk_size=64))
    return path


def test_iq_type_without_imatrix(tmp_path, small_tokenizer):
    tok, vocab = small_tokenizer
    model = build_model(TinySpec(hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab))
    src = save_model(model, tmp_path / "wide", tokenizer_model=tok)
    assert_one_line_error(run_export(src, tmp_path / "o", "--quant", "iq2_xxs"),
                          "needs an importance matrix", "shortquant imatrix")
    assert_nothing_written(tmp_path / "o")


def test_imatrix_for_another_model(tmp_path, src):
    wrong_name = write_imatrix_for(tmp_path / "a.imatrix.gguf", {"blk.7.ffn_up.weight": np.ones(64)})
    assert_one_line_error(run_export(src, tmp_path / "o", "--quant", "q8_0", "--imatrix", wrong_name),
                          "a.imatrix.gguf", "blk.7.ffn_up.weight", "another model")
    wrong_size = write_imatrix_for(tmp_path / "b.imatrix.gguf", {"blk.0.ffn_up.weight": np.ones(32)})
    assert_one_line_error(run_export(src, tmp_path / "o", "--quant", "q8_0", "--imatrix", wrong_size),
                          "b.imatrix.gguf", "blk.0.ffn_up.weight", "32 values")
    assert_nothing_written(tmp_path / "o")


def test_imatrix_with_nonfinite_values(tmp_path, src):
    # Written by hand: our own writer refuses non-finite values too.
    import gguf

    bad = tmp_path / "nan.imatrix.gguf"
    writer = gguf.GGUFWriter(bad, arch="")
    writer.add_type("imatrix")
    writer.add_array(gguf.Keys.IMatrix.DATASETS, ["test"])
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, 1)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, 64)
    sums = np.ones((1, 64), dtype=np.float32)
    sums[0, 3] = np.nan
    writer.add_tensor("blk.0.ffn_up.weight.in_sum2", sums)
    writer.add_tensor("blk.0.ffn_up.weight.counts", np.array([[64.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(run_export(src, tmp_path / "o", "--quant", "q8_0", "--imatrix", bad),
                          "nan.imatrix.gguf", "non-finite")


def test_hub_id_that_cannot_be_downloaded(tmp_path, monkeypatch):
    """A source that is no local folder but looks like a hub id is fetched; failure is one line."""
    import huggingface_hub

    asked = {}

    def offline(repo_id, allow_patterns=None, **kwargs):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        raise OSError("We couldn't connect to the hub\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    result = run_export("nota-ai/st-vicuna-v1.3-5.5b-taylor", tmp_path / "o")
    assert_one_line_error(result, "nota-ai/st-vicuna-v1.3-5.5b-taylor", "downloading it from the hub failed",
                          "couldn't connect")
    assert asked["repo_id"] == "nota-ai/st-vicuna-v1.3-5.5b-taylor" and "*.safetensors" in asked["patterns"]
