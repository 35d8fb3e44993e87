"""Inputs the fuzz run (tests/fuzz_readers.py) found defects with, built by hand: each must now be
one ShortquantError line, quickly, without a large allocation."""

from __future__ import annotations

import json
import struct
import time

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from shortquant.cli import main
from shortquant.errors import ConfigError, GGUFError, QuantError, ShortquantError, SourceError
from shortquant.gguf_check import check_gguf, read_gguf_checked
from shortquant.quant.imatrix import read_imatrix
from shortquant.source.checkpoint import read_config
from shortquant.source.safetensors_file import read_safetensors_index


def safetensors_with(path, entry: dict):
    header = json.dumps({"w": entry}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    return path


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]},            # negative dims, positive product
    {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]},      # overflowed int64 before
    {"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 20]},
    {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]},               # unhashable dtype
    {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]},
    {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]},
])
def test_bad_safetensors_entries(tmp_path, entry):
    with pytest.raises(SourceError, match="corrupt safetensors|unsupported dtype"):
        read_safetensors_index(safetensors_with(tmp_path / "m.safetensors", entry))


@pytest.mark.parametrize("change, field", [
    ({"hidden_size": "64"}, "hidden_size"), ({"num_key_value_heads": {}}, "num_key_value_heads"),
    ({"architectures": 2.0}, "architectures"), ({"num_hidden_layers": 2**40}, "num_hidden_layers"),
    ({"rms_norm_eps": "x"}, "rms_norm_eps"), ({"rope_scaling": 2.0}, "rope_scaling"),
    ({"rope_scaling": {"type": "linear", "factor": -1}}, "rope_scaling.factor"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"), ({"eos_token_id": [2, "x"]}, "eos_token_id"),
])
def test_config_values_of_the_wrong_kind(tmp_path, change, field):
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"'{field}' must be"):
        read_config(tmp_path / "config.json")


def test_config_nulls_are_absent_values(tmp_path):
    config = {"hidden_size": 64, "num_key_value_heads": None, "head_dim": None, "rope_scaling": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_config(tmp_path / "config.json")["head_dim"] is None


def test_index_with_a_nul_in_a_shard_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a\u0000b"}}))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "does not name a shard file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def small_gguf(path, tokens=(b"<unk>", b"<s>", b"</s>", b"a")):
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_token_list(list(tokens))
    writer.add_tensor("w", np.ones((2, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_array_claiming_2_to_the_40_items_is_refused_at_once(tmp_path):
    path = small_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    # The token array's count: right after "tokenizer.ggml.tokens", its type (9) and item type (8).
    key = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens")
    data[key + 8:key + 16] = struct.pack("<Q", 2**40)
    path.write_bytes(bytes(data))
    start = time.monotonic()
    with pytest.raises(GGUFError, match="more than the file holds"):
        read_gguf_checked(path)
    assert time.monotonic() - start < 5      # gguf-py alone loops over 2^40 items


def test_gguf_tokens_equal_up_to_a_nul_are_refused_before_llama_cpp(tmp_path):
    # llama.cpp reads tokens as C strings and aborts the process on a duplicate.
    path = small_gguf(tmp_path / "m.gguf", tokens=(b"<unk>", b"<s>", b"</s>", b"<\x00x"))
    path.write_bytes(path.read_bytes().replace(b"</s>", b"<\x00/>"))
    with pytest.raises(GGUFError, match="twice"):
        check_gguf(path)
    from shortquant.evaluate.llama_backend import LlamaModel

    with pytest.raises(ShortquantError, match="twice"):
        LlamaModel(path, n_ctx=16, vocab_only=True)


def test_legacy_imatrix_claiming_more_values_than_it_holds(tmp_path):
    path = tmp_path / "m.dat"
    name = b"blk.0.attn_q.weight"
    path.write_bytes(struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 1, 2**30) + bytes(16))
    with pytest.raises(QuantError, match="truncated legacy imatrix"):
        read_imatrix(path)


# -- tokenizers (shortquant/tokenizer/, issue 8's code): found by the fuzz run, fixes pending -----------

def _within(seconds: int):
    """Fail (not hang) when the block runs longer than ``seconds``."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def guard():
        def expire(signum, frame):
            raise AssertionError(f"still running after {seconds} s (a size claimed by the file believed?)")
        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    return guard()


def test_sentencepiece_piece_that_is_not_utf8(tmp_path, small_tokenizer):
    import random

    from fuzz_readers import mutate_bytes
    from shortquant.tokenizer import read_tokenizer

    # The fuzz case that found it (seed 0, tokenizer-model, case 70), rebuilt from the demo tokenizer.
    data = mutate_bytes(small_tokenizer[0].read_bytes(), random.Random("0:tokenizer-model:70"))
    (tmp_path / "tokenizer.model").write_bytes(data)
    try:
        read_tokenizer(tmp_path, vocab_size=small_tokenizer[1])
    except ShortquantError as exc:
        assert "\n" not in str(exc)


def test_bpe_vocab_claiming_id_2_to_the_31(tmp_path):
    from fuzz_readers import make_bpe_tokenizer
    from shortquant.tokenizer import read_tokenizer

    folder = make_bpe_tokenizer(tmp_path / "bpe")
    data = json.loads((folder / "tokenizer.json").read_text())
    token = next(iter(t for t, i in data["model"]["vocab"].items() if i == 100))
    data["model"]["vocab"][token] = 2**31
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with _within(3), pytest.raises(ShortquantError):   # 3 s: the runaway loop also eats memory
        read_tokenizer(folder, pre="gpt-2")
