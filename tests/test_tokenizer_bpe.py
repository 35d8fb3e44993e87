"""BPE tokenizers: llama.cpp's own test vectors through our GGUFs, pre-tokenizer detection, bad input.

The vector tests export a tiny model carrying the real Llama-3 and Qwen2 ``tokenizer.json``
(``../shared/fixtures/tokenizers/``) and tokenize llama.cpp's vectors
(``models/ggml-vocab-{llama-bpe,qwen2}.gguf.inp/.out``, fetched into ``.cache/vocab-vectors`` by
``scripts/get_vocab_vectors.py``) with llama-cpp-python, as llama.cpp's ``test-tokenizer-0`` does
(no BOS, special tokens not parsed). Both skip when their files are absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from checkpoints import shared_fixture
from families import build_family_model, make_bpe_tokenizer
from shortquant.cli import main
from shortquant.errors import TokenizerError
from shortquant.tokenizer import read_tokenizer
from shortquant.tokenizer.pre_tokenizer import known_pre_names, pre_for_hash, probe_hash

REPO = Path(__file__).resolve().parents[1]
VECTORS = Path(os.environ.get("SHORTQUANT_VOCAB_VECTORS", REPO / ".cache" / "vocab-vectors"))
FIXTURE_TOKENIZERS = {"llama-bpe": ("llama", 128256), "qwen2": ("qwen2", 151936)}


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    inp, out = VECTORS / f"ggml-vocab-{name}.gguf.inp", VECTORS / f"ggml-vocab-{name}.gguf.out"
    if not (inp.is_file() and out.is_file()):
        pytest.skip(f"llama.cpp's test vectors for {name} are not in {VECTORS} (scripts/get_vocab_vectors.py)")
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if texts and texts[-1].endswith("\n__ggml_vocab_test__"):
        texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__")
    ids = [[int(t) for t in line.split()] for line in out.read_text(encoding="utf-8").splitlines()]
    texts = texts[:len(ids)]
    assert len(texts) == len(ids) > 0
    return list(zip(texts, ids))


def export_with_tokenizer(tmp_path: Path, tokenizer_dir: Path, family: str, rows: int, *extra) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, src / f.name)
    build_family_model(family, rows, layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=1).save_pretrained(src)
    result = CliRunner().invoke(main, ["export", str(src), "--out", str(tmp_path / "out"), "-q", "f16",
                                       "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return next((tmp_path / "out").glob("*.gguf"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FIXTURE_TOKENIZERS))
def test_llama_cpp_vectors_pass_through_our_gguf(tmp_path, name):
    import gguf
    import llama_cpp

    folder = shared_fixture(f"tokenizers/{name}")
    vectors = read_vectors(name)
    family, rows = FIXTURE_TOKENIZERS[name]
    path = export_with_tokenizer(tmp_path, folder, family, rows)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.pre").contents() == name   # detected from the probe hash
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    failures = [(text, expected, got) for text, expected in vectors
                if (got := llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) != expected]
    assert not failures, f"{len(failures)}/{len(vectors)} vectors differ, first: {failures[0]!r}"


def test_fixture_tokenizers_read_as_llama_cpp_expects():
    folder = shared_fixture("tokenizers/llama-bpe")
    spec = read_tokenizer(folder, vocab_size=128256)
    assert (spec.model, spec.pre, spec.vocab_size, len(spec.merges)) == ("gpt2", "llama-bpe", 128256, 280147)
    assert (spec.bos_id, spec.eos_id, spec.eot_id, spec.add_bos, spec.add_eos) == (128000, 128001, 128009, True,
                                                                                     False)
    assert spec.token_types[128000].name == "CONTROL" and spec.token_types[1000].name == "NORMAL"


def test_probe_table_is_llama_cpps():
    assert {"llama-bpe", "qwen2", "smollm", "tekken", "gpt-2"} <= set(known_pre_names())
    assert pre_for_hash(probe_hash([1, 2, 3])) is None
    # two hashes quoted from llama.cpp's table (conversion/base.py)
    assert pre_for_hash("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5") == "llama-bpe"
    assert pre_for_hash("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249") == "smollm"


def test_pair_and_string_merges_give_the_same_gguf_merges(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_bpe_tokenizer(a, "llama3")
    shutil.copytree(a, b)
    data = json.loads((b / "tokenizer.json").read_text())
    merges = data["model"]["merges"]
    data["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in merges]
    (b / "tokenizer.json").write_text(json.dumps(data))
    spec_a, spec_b = (read_tokenizer(p, pre="llama-bpe") for p in (a, b))
    assert spec_a.merges == spec_b.merges and len(spec_a.merges) > 100
    assert all(m.count(" ") == 1 for m in spec_a.merges)


def test_token_types_padding_and_specials(tmp_path):
    n = make_bpe_tokenizer(tmp_path, "qwen2")
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": n, "content": "<tool>", "special": False, "normalized": True,
                                 "single_word": False, "lstrip": False, "rstrip": False})
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": n - 3}))
    spec = read_tokenizer(tmp_path, vocab_size=n + 8, pre="qwen2")
    types = [t.name for t in spec.token_types]
    assert types[n - 1] == "CONTROL" and types[n] == "USER_DEFINED" and types[n + 1:] == ["UNUSED"] * 7
    assert spec.tokens[n + 1] == f"[PAD{n + 1}]".encode()
    assert spec.bos_id == n - 3 and not spec.add_bos        # numbered in config.json, not added (ByteLevel)
    assert spec.eos_id == n - 3 and spec.eot_id == n - 1    # <|endoftext|>, <|im_end|>


# --- bad input: one line naming the file and the problem, exit 2, nothing written ------------------

def export_error(tmp_path, src, *extra):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(src), "--out", str(out), "-q", "f16", "--quiet", *extra])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not list(out.glob("*.gguf*")) if out.exists() else True
    return lines[0]


def small_model_dir(tmp_path, rows=None, style="llama3"):
    src = tmp_path / "src"
    n = make_bpe_tokenizer(src, style)
    build_family_model("llama", rows or n, layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=1).save_pretrained(src)
    return src, n


def test_unknown_pre_tokenizer_names_the_hash_and_suggests_pre(tmp_path):
    src, _ = small_model_dir(tmp_path)
    line = export_error(tmp_path, src)
    assert "tokenizer.json: unknown BPE pre-tokenizer (probe hash " in line and "--pre NAME" in line
    assert "--pre" in line


def test_unknown_pre_name_is_refused_with_a_suggestion(tmp_path):
    src, _ = small_model_dir(tmp_path)
    line = export_error(tmp_path, src, "--pre", "llama_bpe")
    assert "unknown pre-tokenizer 'llama_bpe'" in line and "did you mean llama-bpe" in line


@pytest.mark.parametrize("damage, message", [
    (lambda d: "{not json", "tokenizer.json: not valid JSON"),
    (lambda d: json.dumps({**d, "model": {**d["model"], "merges": d["model"]["merges"] + ["Ġzz qq"]}}),
     "names 'Ġzz', which is not in the vocabulary"),
    (lambda d: json.dumps({**d, "added_tokens": d["added_tokens"] + [
        {"id": 100000, "content": "<|far|>", "special": True, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False}]}), "has id 100000, past the model's"),
    (lambda d: json.dumps({**d, "model": {**d["model"], "type": "Unigram"}}), "'Unigram' is not supported"),
])
def test_bad_tokenizer_json(tmp_path, damage, message):
    src, _ = small_model_dir(tmp_path)
    data = json.loads((src / "tokenizer.json").read_text())
    (src / "tokenizer.json").write_text(damage(data))
    line = export_error(tmp_path, src, "--pre", "llama-bpe")
    assert str(src / "tokenizer.json") in line and message in line, line


def test_more_tokenizer_entries_than_embedding_rows(tmp_path):
    src, n = small_model_dir(tmp_path, rows=300)
    line = export_error(tmp_path, src, "--pre", "llama-bpe")
    assert "tokenizer.json" in line and "embedding has only 300 rows" in line


def test_read_tokenizer_without_any_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.model .* or tokenizer.json"):
        read_tokenizer(tmp_path)
