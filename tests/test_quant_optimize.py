"""Optimized type mixes end to end: budgets counted to the byte, metadata, the fallback.

The end-to-end tests export a tiny random LLaMA whose widths are multiples of 256 (so the K
types apply) with ``--optimize``; the calibration text is the first half of the package's
built-in evaluation text, never the text anything is evaluated on.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from checkpoints import TinySpec, build_model, save_model
from shortquant import keys
from shortquant.cli import main
from shortquant.evaluate.perplexity import DEFAULT_TEXT


# -- end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Calibration text: the first half of the built-in evaluation text; the second half is
    left for evaluation."""
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    cut = text.index("\n", len(text) // 2)
    folder = tmp_path_factory.mktemp("texts")
    (folder / "calib.txt").write_text(text[:cut], encoding="utf-8")
    (folder / "eval.txt").write_text(text[cut:], encoding="utf-8")
    return folder / "calib.txt", folder / "eval.txt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_tokenizer):
    tok_path, vocab = small_tokenizer
    spec = TinySpec(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=vocab, extra={"initializer_range": 0.05})
    model = build_model(spec)
    src = save_model(model, tmp_path_factory.mktemp("tiny") / "src", tokenizer_model=tok_path)
    # a card whose facts export adds to every file: the budgets must count them too
    (src / "README.md").write_text("---\nlicense: mit\nlanguage: [en]\n---\n# tiny\n")
    return src


def run_export(src, out, *args):
    result = CliRunner().invoke(main, ["export", str(src), "--out", str(out), "--quiet", *args])
    return result


def library_export(src, out, quants, calib, **request):
    """export() with a small measurement (few short chunks), so the tests stay quick."""
    from shortquant.export import ExportOptions, export
    from shortquant.quant.optimize import OptimizeRequest

    req = OptimizeRequest(calib=calib, ctx=64, probe_chunks=2, verify_chunks=2, **request)
    return export(src, ExportOptions(quants=tuple(quants), out_dir=out, quiet=True, threads=1, optimize=req))


def test_optimize_q4_k_m(tiny, texts, tmp_path):
    calib, _ = texts
    std = run_export(tiny, tmp_path / "std", "-q", "q4_k_m")
    assert std.exit_code == 0, std.output
    standard = next((tmp_path / "std").glob("*-Q4_K_M.gguf"))

    report = library_export(tiny, tmp_path / "opt", ["q4_k_m"], calib, optimize=True)
    (outcome,) = report.optimized
    (written,) = report.files
    # the budget is the standard file's exact size, and it is never exceeded
    assert outcome.target.budget == standard.stat().st_size
    assert written.bytes <= standard.stat().st_size
    assert written.bytes == outcome.bytes
    reader = gguf.GGUFReader(written.path)
    if outcome.optimized:
        assert written.path.name.endswith("-Q4_K_M_OPT.gguf")
        assert reader.get_field(keys.OPTIMIZE_BUDGET).contents() == standard.stat().st_size
        assert reader.get_field(keys.OPTIMIZE_BASE_MIX).contents() == "q4_k_m"
        kld = reader.get_field(keys.OPTIMIZE_KLD).contents()
        base = reader.get_field(keys.OPTIMIZE_KLD_BASE).contents()
        assert kld < base
        changes = reader.get_field(keys.OPTIMIZE_CHANGES).contents()
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        for change in changes:
            name, qtype = change.split("=")
            assert types[name] == qtype
        from shortquant.publish.card import read_gguf

        assert read_gguf(written.path).type == "Q4_K_M_OPT"   # the card lists it as a variant
    else:   # the fallback is the standard file, byte for byte
        assert written.path.read_bytes() == standard.read_bytes()
        assert "wrote the standard" in " ".join(outcome.notes)

    again = library_export(tiny, tmp_path / "again", ["q4_k_m"], calib, optimize=True)
    assert again.files[0].path.read_bytes() == written.path.read_bytes()   # same inputs, same file


def test_fallback_when_the_optimized_mix_measures_worse(tiny, texts, tmp_path, monkeypatch):
    from shortquant.quant import optimize

    real = optimize.measure_mix
    standard_types = {}

    def worse_unless_standard(checkpoint, plan, prober, types, *args, **kwargs):
        kld = real(checkpoint, plan, prober, types, *args, **kwargs)
        if not standard_types:
            standard_types.update(optimize.plan_file(plan, "q4_k_m", tmp_path).tensor_types)
        return kld if types == standard_types else kld + 1.0

    monkeypatch.setattr(optimize, "measure_mix", worse_unless_standard)
    calib, _ = texts
    report = library_export(tiny, tmp_path / "out", ["q4_k_m"], calib, optimize=True)
    (outcome,) = report.optimized
    assert not outcome.optimized
    assert "wrote the standard Q4_K_M instead" in outcome.notes[0]
    (path,) = (tmp_path / "out").glob("*.gguf")
    assert path.name.endswith("-Q4_K_M.gguf")
    assert gguf.GGUFReader(path).get_field(keys.OPTIMIZE_BUDGET) is None


def test_target_size_and_unreachable_target(tiny, texts, tmp_path):
    calib, _ = texts
    std = run_export(tiny, tmp_path / "std", "-q", "q3_k_m")
    standard = next((tmp_path / "std").glob("*.gguf"))
    budget = standard.stat().st_size + 5000
    assert std.exit_code == 0, std.output
    report = library_export(tiny, tmp_path / "t", [], calib, target_size=budget)
    (written,) = report.files
    assert written.bytes <= budget
    (outcome,) = report.optimized
    assert outcome.target.reference.quant == "q3_k_m"   # the largest standard mix within the budget

    low = run_export(tiny, tmp_path / "low", "--target-bpw", "1.0", "--calib", str(calib))
    assert low.exit_code == 2
    assert "below the smallest reachable size" in low.stderr
    assert low.stderr.count("\n") == 1 and "Traceback" not in low.stderr, low.stderr
    assert not list((tmp_path / "low").glob("*.gguf*"))


def test_optimize_needs_calibration(tiny, tmp_path):
    result = run_export(tiny, tmp_path / "x", "-q", "q4_k_m", "--optimize")
    assert result.exit_code == 2
    assert "--calib" in result.stderr


@pytest.mark.parametrize("layout", ["contiguous", "gapped-stale-config"])
def test_probe_swaps_back_exactly(tiny, texts, tmp_path, layout):
    """Every planned tensor, brought back to the source layout, is the HF parameter itself (a
    pruned checkpoint with gaps and a stale config included), and a probe leaves the model as
    it found it."""
    import shutil

    from checkpoints import edit_config, rename_layers
    from shortquant.export import ExportOptions, Piece, load_piece, make_model_plan
    from shortquant.quant.imatrix import chunk_tokens
    from shortquant.quant.probe import Prober, calibration_tokens, hf_name
    from shortquant.source.checkpoint import open_checkpoint
    from shortquant.transforms import undo_transform

    src = tiny
    if layout != "contiguous":
        src = Path(shutil.copytree(tiny, tmp_path / "gapped"))
        rename_layers(src, {0: 0, 1: 2, 2: 3})
        edit_config(src, num_hidden_layers=4)
    checkpoint = open_checkpoint(src)
    plan = make_model_plan(checkpoint, ExportOptions())
    tokens, bos = calibration_tokens(src, texts[0].read_text())
    chunks = chunk_tokens(tokens, ctx=64, chunks=2, bos_id=bos)
    prober = Prober(src, chunks, stored_blocks=plan.block_map.stored)
    assert len(prober.model.model.layers) == 3
    assert prober.kld() == 0.0
    reference = Prober(tiny, chunks)   # the same weights, contiguous: the same outputs
    for ours, theirs in zip(prober.reference, reference.reference):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-9)
    for t in plan.tensors:
        data = load_piece(checkpoint, Piece(t, 0, t.shape[0]))
        param = prober.params[hf_name(t.source, plan.block_map.stored)]
        np.testing.assert_array_equal(undo_transform(t, data), param.detach().numpy())
    q = next(t for t in plan.tensors if t.name == "blk.0.attn_q.weight")
    data = load_piece(checkpoint, Piece(q, 0, q.shape[0]))
    prober.set_weight(q.source, undo_transform(q, np.zeros_like(data)))
    assert prober.kld() > 0
    prober.restore()
    assert prober.kld() == 0.0
