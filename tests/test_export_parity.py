"""Byte parity of whole exported files with llama.cpp's quantizer.

A Hugging Face checkpoint (8 blocks, widths multiples of 256, GQA 8/4) is exported by us once
as F32 and once as a ladder of quantized types (with and without an importance matrix). For
every type, llama.cpp's ``llama_model_quantize`` turns our F32 file into its own file; every
tensor's type and bytes must equal ours.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from checkpoints import TinySpec, build_model, save_model
from shortquant.cli import main
from test_quant_parity import llama_quantize, make_imatrix

LADDER = ["q8_0", "q4_0", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k", "iq4_xs"]
WITH_IMATRIX = ["q4_k_m", "iq3_xxs"]


def run(*args):
    result = CliRunner().invoke(main, [*map(str, args), "--quiet"])
    assert result.exit_code == 0, result.output
    return result


def tensors_of(path):
    return {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def assert_same_file_contents(ours, reference, quant):
    mine, theirs = tensors_of(ours), tensors_of(reference)
    assert sorted(mine) == sorted(theirs)
    types = [(n, theirs[n][0].name, mine[n][0].name) for n in theirs if theirs[n][0] != mine[n][0]]
    assert not types, f"{quant}: types differ (name, llama.cpp, ours): {types}"
    data = [n for n in theirs if theirs[n][1] != mine[n][1]]
    assert not data, f"{quant}: bytes differ: {data}"
    return {t for t, _ in mine.values()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_tokenizer):
    tmp = tmp_path_factory.mktemp("export-parity")
    tok, vocab = small_tokenizer
    model = build_model(TinySpec(hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab,
                                 extra={"initializer_range": 0.05}))
    src = save_model(model, tmp / "src", tokenizer_model=tok)
    args = ["export", src, "--out", tmp / "ours"]
    for quant in ["f32", *LADDER]:
        args += ["--quant", quant]
    run(*args)
    files = {p.name.rsplit("-", 1)[1].removesuffix(".gguf").lower(): p for p in (tmp / "ours").glob("*.gguf")}
    return tmp, src, files


@pytest.mark.parametrize("quant", LADDER)
def test_export_matches_llama_quantize(exported, quant):
    tmp, _, files = exported
    reference = tmp / f"llama-{quant}.gguf"
    assert llama_quantize(files["f32"], reference, quant) == 0
    types = assert_same_file_contents(files[quant], reference, quant)
    if quant in ("q4_k_m", "q5_k_m", "q3_k_m", "q2_k"):
        assert len(types - {gguf.GGMLQuantizationType.F32}) > 1   # the mix really mixes


def test_export_with_imatrix_matches_llama_quantize(exported):
    tmp, src, files = exported
    f32 = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))
           for t in gguf.GGUFReader(files["f32"]).tensors}
    importance = make_imatrix(f32, tmp)           # writes tmp/model.imatrix.gguf
    out = tmp / "ours-imatrix"
    args = ["export", src, "--out", out, "--imatrix", tmp / "model.imatrix.gguf"]
    for quant in WITH_IMATRIX:
        args += ["--quant", quant]
    run(*args)
    for quant in WITH_IMATRIX:
        ours = next(out.glob(f"*-{quant.upper()}.gguf"))
        reference = tmp / f"llama-{quant}-imatrix.gguf"
        assert llama_quantize(files["f32"], reference, quant, importance) == 0
        assert_same_file_contents(ours, reference, quant)
    # and the imatrix mattered: q4_k_m bytes differ from the plain export
    plain = tensors_of(files["q4_k_m"])["blk.3.ffn_up.weight"][1]
    assert tensors_of(next(out.glob("*-Q4_K_M.gguf")))["blk.3.ffn_up.weight"][1] != plain


def test_every_exported_file_generates(exported):
    import llama_cpp

    _, _, files = exported
    for quant, path in files.items():
        llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, n_threads=2)
        out = llm.create_completion("Once upon a time", max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] > 0, quant
