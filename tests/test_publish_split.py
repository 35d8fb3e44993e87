"""Split GGUF files: llama.cpp loads them and computes the same logits as from the unsplit file."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest

from shortquant.errors import PublishError
from shortquant.gguf_info import parse_split_name, split_name, split_parts
from shortquant.publish.split import split_gguf
from shortquant.sizes import parse_size

SPLIT_KEYS = (gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
              gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)


@pytest.fixture
def model(tmp_path, demo_gguf):
    """A copy of the demo model's F32 file (20 MB, 57 tensors of 1 KB to 786 KB)."""
    path = tmp_path / "demo.gguf"
    shutil.copy(demo_gguf, path)
    return path


def _logits(path, text=b"Once upon a time, there was a little girl"):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    tokens = llm.tokenize(text)
    llm.eval(tokens)
    scores = np.array(llm.scores[:len(tokens)])
    llm.close()
    return scores


def test_split_files_load_in_llama_cpp_with_same_logits(model):
    parts = split_gguf(model, "4M", progress=False)
    assert len(parts) >= 3
    assert [p.name for p in parts] == [f"demo-{i:05d}-of-{len(parts):05d}.gguf"
                                       for i in range(1, len(parts) + 1)]
    assert not list(model.parent.glob("*.part"))
    reference = _logits(model)
    from_split = _logits(parts[0])
    assert reference.shape == from_split.shape and np.abs(reference).max() > 1
    assert np.array_equal(reference, from_split)


def test_split_layout_follows_gguf_split(model):
    original = gguf.GGUFReader(model)
    max_bytes = parse_size("4M")
    parts = split_gguf(model, max_bytes, progress=False)
    readers = [gguf.GGUFReader(p) for p in parts]
    copied = [k for k in original.fields if not k.startswith("GGUF.")]

    for index, reader in enumerate(readers):
        fields = {k: reader.fields[k].contents() for k in SPLIT_KEYS}
        assert fields == {SPLIT_KEYS[0]: index, SPLIT_KEYS[1]: len(parts),
                          SPLIT_KEYS[2]: len(original.tensors)}
        assert reader.fields[SPLIT_KEYS[0]].types == [gguf.GGUFValueType.UINT16]
        assert reader.fields[SPLIT_KEYS[2]].types == [gguf.GGUFValueType.INT32]
        own = [k for k in reader.fields if not k.startswith("GGUF.")]
        # All metadata in the first part, then the split keys; only split keys elsewhere.
        assert own == (copied if index == 0 else []) + list(SPLIT_KEYS)
        data = sum(-(-int(t.n_bytes) // reader.alignment) * reader.alignment for t in reader.tensors)
        assert data <= max_bytes or len(reader.tensors) == 1

    for key in copied:
        first = readers[0].fields[key]
        assert first.types == original.fields[key].types
        assert first.contents() == original.fields[key].contents()

    # Every tensor, in order, with the same name, type, shape and bytes.
    split_tensors = [t for r in readers for t in r.tensors]
    assert [t.name for t in split_tensors] == [t.name for t in original.tensors]
    for a, b in zip(original.tensors, split_tensors):
        assert (a.tensor_type, list(a.shape)) == (b.tensor_type, list(b.shape))
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8))


def test_a_tensor_larger_than_the_limit_gets_its_own_part(model, tmp_path):
    parts = split_gguf(model, 1, outdir=tmp_path / "parts", progress=False)
    assert len(parts) == len(gguf.GGUFReader(model).tensors)
    assert all(p.parent == tmp_path / "parts" for p in parts)


def test_small_file_is_not_split(model):
    assert split_gguf(model, "48G", progress=False) == [model]
    assert sorted(p.name for p in model.parent.iterdir()) == [model.name]


def test_split_file_is_not_split_again(model):
    parts = split_gguf(model, "4M", progress=False)
    with pytest.raises(PublishError, match="already a split file"):
        split_gguf(parts[0], "1M", progress=False)


@pytest.mark.parametrize("text, expected", [("48G", 48 * 10**9), ("500M", 5 * 10**8), ("300k", 300_000),
                                            ("1000", 1000), (7, 7), ("1.5G", 15 * 10**8), ("3.2gb", 32 * 10**8)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["48X", "", "-1G", "0", "0.0G", "1,5G"])
def test_parse_size_rejects(text):
    with pytest.raises(PublishError):
        parse_size(text, PublishError)


def test_split_max_size_and_target_size_take_the_same_sizes(model, tmp_path):
    """One parser: the size `export --target-size` accepts, `--split-max-size` accepts too."""
    from click.testing import CliRunner

    from shortquant.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time")
    for option in ("--split-max-size", "--target-size"):
        bad = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "x"), "--calib", str(calib), option, "1.5X"])
        assert bad.exit_code == 2 and f"{option}: invalid size '1.5X'" in bad.stderr, bad.output
        assert not (tmp_path / "x").exists()
    parts = split_gguf(model, "0.004G", outdir=tmp_path / "parts", progress=False)   # 4 MB, as "4M"
    assert len(parts) > 1 and all(p.stat().st_size <= 4 * 10**6 for p in parts)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(PublishError, match="not a readable GGUF"):
        split_gguf(bad, "1M", progress=False)


def test_names_round_trip(tmp_path):
    name = split_name(tmp_path / "M-Q8_0", 1, 3)
    assert name.name == "M-Q8_0-00002-of-00003.gguf"
    assert parse_split_name(name) == ("M-Q8_0", 1, 3)
    assert parse_split_name(tmp_path / "M-Q8_0.gguf") is None
    assert [p.name for p in split_parts(split_name(tmp_path / "M", 0, 2))] == [
        "M-00001-of-00002.gguf", "M-00002-of-00002.gguf"]
