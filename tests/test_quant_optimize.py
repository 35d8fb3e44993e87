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


def test_optimize_q4_k_m(tiny, texts, tmp_path, monkeypatch):
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
        from shortquant.gguf_info import read_gguf

        assert read_gguf(written.path).type == "Q4_K_M_OPT"   # the card lists it as a variant
        import json

        shown = CliRunner().invoke(main, ["inspect", str(written.path), "--json"])   # inspect shows the record
        assert shown.exit_code == 0, shown.output
        info = json.loads(shown.stdout)
        assert info["type"] == "Q4_K_M_OPT" and info["bytes"] == written.bytes
        assert info["optimize"]["changes"] == [c for c in changes if c != "none"]
        assert info["optimize"]["budget_bytes"] == standard.stat().st_size
        text = CliRunner().invoke(main, ["inspect", str(written.path)]).stdout
        assert "optimized mix: budget" in text and f"{len(info['optimize']['changes'])} tensors differ" in text
        # eval names it as inspect does, so report and the card draw it as a series of its own
        evaluated = CliRunner().invoke(main, ["eval", str(written.path), "--ctx", "64", "--chunks", "1", "--json",
                                              "--quiet"])
        assert evaluated.exit_code == 0, evaluated.output
        assert json.loads(evaluated.stdout)["files"][0]["type"] == "Q4_K_M_OPT"
    else:   # the fallback is the standard file, byte for byte
        assert written.path.read_bytes() == standard.read_bytes()
        assert "wrote the standard" in " ".join(outcome.notes)

    import dataclasses

    from shortquant import export as export_module
    from shortquant.export import ExportOptions, make_model_plan, source_metadata, write_files
    from shortquant.source.checkpoint import open_checkpoint

    handed = {}

    def spy(*args):
        handed.update(args[-1] or {})
        return write_files(*args)

    monkeypatch.setattr(export_module, "write_files", spy)
    again = library_export(tiny, tmp_path / "again", ["q4_k_m"], calib, optimize=True)
    assert again.files[0].path.read_bytes() == written.path.read_bytes()   # same inputs, same file
    assert handed[outcome.file.quant]   # written from the encodings the verification measured
    assert not again.optimized[0].encoded   # and not kept in the report afterwards

    # quantizing afresh gives the same bytes
    checkpoint = open_checkpoint(tiny)
    options = ExportOptions(out_dir=tmp_path / "fresh", quiet=True)
    plan = make_model_plan(checkpoint, options)
    options.out_dir.mkdir()
    file = dataclasses.replace(outcome.file, path=options.out_dir / written.path.name)
    fresh = write_files(checkpoint, plan, [file], options, extra_metadata=source_metadata(checkpoint, plan, options))
    assert fresh.files[0].path.read_bytes() == written.path.read_bytes()


def test_fallback_when_the_optimized_mix_measures_worse(tiny, texts, tmp_path, monkeypatch):
    from shortquant.quant import optimize

    real = optimize.MixVerifier.measure_many
    standard_types = {}

    def worse_unless_standard(self, mixes, which, progress=None):
        klds = real(self, mixes, which, progress)
        if not standard_types:
            standard_types.update(optimize.plan_file(self.plan, "q4_k_m", tmp_path).tensor_types)
        return [kld if types == standard_types else kld + 1.0 for types, kld in zip(mixes, klds)]

    monkeypatch.setattr(optimize.MixVerifier, "measure_many", worse_unless_standard)
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
    from shortquant.export import ExportOptions, make_model_plan
    from shortquant.stream import Piece, load_piece
    from shortquant.quant.imatrix import chunk_tokens
    from shortquant.quant.probe import Prober, hf_name
    from shortquant.tokenizer.encode import encode_text
    from shortquant.source.checkpoint import open_checkpoint
    from shortquant.transforms import undo_transform

    src = tiny
    if layout != "contiguous":
        src = Path(shutil.copytree(tiny, tmp_path / "gapped"))
        rename_layers(src, {0: 0, 1: 2, 2: 3})
        edit_config(src, num_hidden_layers=4)
    checkpoint = open_checkpoint(src)
    plan = make_model_plan(checkpoint, ExportOptions())
    tokens, bos = encode_text(src, texts[0].read_text())
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


def _forward_kld(model_dir, chunks, source: str | None, value: np.ndarray | None) -> float:
    """KL(model || model with ``source`` set to ``value``) per token, from transformers' own
    forward passes of freshly loaded models (no kept inputs, no sweeps)."""
    import torch

    from shortquant.families.hf_model import load_torch_model

    base, changed = load_torch_model(model_dir), load_torch_model(model_dir)
    with torch.no_grad():
        changed.get_parameter(source).copy_(torch.from_numpy(value))
        total, count = 0.0, 0
        for chunk in chunks:
            ids = torch.tensor([list(chunk)])
            ref = torch.log_softmax(base(input_ids=ids).logits[0].float(), -1)
            got = torch.log_softmax(changed(input_ids=ids).logits[0].float(), -1)
            total += float((ref.exp() * (ref - got)).sum(dtype=torch.float64))
            count += ref.shape[0]
    return total / count


def test_probes_measure_what_a_forward_pass_measures(tiny, texts):
    """One sweep of several variants (a changed block, a later block, the output head, the
    embedding) gives each the KLD transformers' forward pass gives, resident and streamed
    from disk alike; a variant that changes nothing measures 0."""
    from shortquant.quant.imatrix import chunk_tokens
    from shortquant.quant.probe import Prober

    tokens, bos = encode_text_of(tiny, texts[0])
    chunks = chunk_tokens(tokens, ctx=64, chunks=3, bos_id=bos)
    resident = Prober(tiny, chunks, probe_chunks=2)
    streamed = Prober(tiny, chunks, probe_chunks=2, stream=True)
    assert streamed.streamed and not resident.streamed
    assert {p.device.type for n, p in streamed.model.named_parameters() if ".layers." in n} == {"meta"}
    rng = np.random.default_rng(0)
    variants, expected = [], []
    for source in ["model.layers.0.self_attn.v_proj.weight", "model.layers.2.mlp.down_proj.weight", "lm_head.weight",
                   "model.embed_tokens.weight"]:
        w = resident.params[source].detach().numpy()
        noisy = w + rng.standard_normal(w.shape).astype(np.float32) * np.abs(w).mean()
        variants.append({source: noisy})
        expected.append(_forward_kld(tiny, chunks[:2], source, noisy))
    variants.append({})
    for prober in (resident, streamed):
        got = prober.kld_many(variants, prober.probe_chunks)
        assert got[-1] == 0.0
        for kld, want in zip(got, expected):
            assert kld > 1e-4 and kld == pytest.approx(want, rel=1e-4)
    for a, b in zip(resident.reference, streamed.reference):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    for name, sq in resident.col_sq.items():
        np.testing.assert_allclose(sq, streamed.col_sq[name], rtol=1e-5)


@pytest.mark.parametrize("layout", ["llm-pruner", "flap", "llm-drop", "decilm"])
def test_probe_loads_width_pruned_and_deci_models(tmp_path, layout):
    """The prober builds width-pruned, sub-block-dropped and DeciLM checkpoints block by block
    (transformers' from_pretrained cannot), its outputs are the checkpoint's, and a probe of the
    last block measures what the forward pass does, streamed too."""
    import pruned
    from shortquant.quant.probe import Prober

    model, src = pruned.LAYOUTS[layout](tmp_path / "src")
    chunks = [[1, 17, 250, 3, 99, 311, 7, 128, 300, 45, 6, 2, 77, 200, 31, 260]] * 2
    prober = Prober(src, chunks, probe_chunks=2)
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([chunks[0]])).logits[0].float()
    np.testing.assert_allclose(prober.reference[0].numpy(), torch.log_softmax(logits, -1).numpy(), atol=1e-4)
    last = prober.n_blocks - 1
    name = next(n for n in prober.params if n.startswith(f"model.layers.{last}.") and n.endswith("proj.weight"))
    w = prober.params[name].detach().numpy()
    want = _forward_kld(src, chunks, name, w * 1.5)
    for p in (prober, Prober(src, chunks, probe_chunks=2, stream=True)):
        (kld,) = p.kld_many([{name: w * 1.5}])
        assert kld > 0 and kld == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("layout", ["llm-pruner", "decilm"])
def test_optimize_width_pruned_and_deci(tmp_path, texts, layout):
    """A width-pruned model (FFN padded to 256 for the K types) and a DeciLM with linear
    attention and a zero stand-in: optimized within the standard file's size, and the file runs
    in llama.cpp, its logits near the f32 file's."""
    import pruned
    from llama_eval import gguf_logits

    calib, _ = texts
    _, src = pruned.LAYOUTS[layout](tmp_path / "src")
    std = run_export(src, tmp_path / "std", "-q", "q4_k_m", "-q", "f32")
    assert std.exit_code == 0, std.output
    standard = next((tmp_path / "std").glob("*-Q4_K_M.gguf"))
    report = library_export(src, tmp_path / "opt", ["q4_k_m"], calib, optimize=True)
    (written,) = report.files
    assert written.bytes <= standard.stat().st_size
    tokens = [1, 17, 250, 3, 99, 311, 7, 128]
    ours = gguf_logits(written.path, tokens)
    exact = gguf_logits(next((tmp_path / "std").glob("*-F32.gguf")), tokens)
    assert np.isfinite(ours).all()
    assert np.abs(ours - exact).max() < 0.5 * np.abs(exact).max()


def test_the_users_tensor_types_are_kept(tiny, texts, tmp_path):
    """--tensor-type and --output-type fix those tensors; the optimizer works around them."""
    calib, _ = texts
    result = run_export(tiny, tmp_path / "out", "-q", "q4_k_m", "--optimize", "--calib", str(calib),
                        "--tensor-type", "ffn_down=q8_0", "--output-type", "f16")
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "out").glob("*.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["output.weight"] == "F16"
    assert all(q == "Q8_0" for n, q in types.items() if "ffn_down" in n)


def test_optimize_with_an_imatrix_from_llama_cpp_evaluation(tiny, texts, tmp_path):
    """An importance matrix in llama-imatrix's format (made through llama.cpp's own evaluation)
    drives both the standard mix and the optimized one; the budget is the imatrix-made file's."""
    calib, _ = texts
    assert run_export(tiny, tmp_path / "f32", "-q", "f32").exit_code == 0
    f32 = next((tmp_path / "f32").glob("*.gguf"))
    imatrix = tmp_path / "tiny.imatrix.gguf"
    made = CliRunner().invoke(main, ["imatrix", str(f32), "--text", str(calib), "--ctx", "64", "--chunks", "4",
                                     "-o", str(imatrix), "--quiet"])
    assert made.exit_code == 0, made.output
    std = run_export(tiny, tmp_path / "std", "-q", "q3_k_m", "--imatrix", str(imatrix))
    assert std.exit_code == 0, std.output
    standard = next((tmp_path / "std").glob("*.gguf"))
    opt = run_export(tiny, tmp_path / "opt", "-q", "q3_k_m", "--optimize", "--calib", str(calib),
                     "--imatrix", str(imatrix))
    assert opt.exit_code == 0, opt.output
    (written,) = (tmp_path / "opt").glob("*.gguf")
    assert written.stat().st_size <= standard.stat().st_size
    reader = gguf.GGUFReader(written)
    if written.name.endswith("_OPT.gguf"):
        assert reader.get_field(keys.OPTIMIZE_BUDGET).contents() == standard.stat().st_size
    else:
        assert written.read_bytes() == standard.read_bytes()


# -- a ladder from one measurement ---------------------------------------------------------------
def test_a_ladder_is_measured_once_and_each_file_is_the_single_runs(tiny, texts, tmp_path, monkeypatch):
    """-q q3_k_m -q q4_k_m --optimize --target-bpw 4.5,5.5: one measurement, four files, each
    within its budget and byte-identical to a run for that target alone."""
    from shortquant.quant import optimize

    calls = []
    real = optimize.measure
    monkeypatch.setattr(optimize, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    calib, _ = texts
    ladder = library_export(tiny, tmp_path / "ladder", ["q3_k_m", "q4_k_m"], calib, optimize=True,
                            target_bpw=(4.5, 5.5))
    assert len(calls) == 1
    assert len(ladder.files) == len(ladder.optimized) == 4
    for outcome in ladder.optimized:
        assert outcome.bytes <= outcome.target.budget
        assert outcome.peak_rss["solve and verify"] >= outcome.peak_rss["before"] > 0
    by_name = {f.path.name: f for f in ladder.files}
    assert sum(n.endswith("_OPT.gguf") for n in by_name) >= 2   # at least the bpw targets are optimized
    singles = [(["q4_k_m"], {"optimize": True}), ([], {"target_bpw": 5.5})]
    for quants, request in singles:
        single = library_export(tiny, tmp_path / f"single{len(calls)}", quants, calib, **request)
        (alone,) = single.files
        assert alone.path.read_bytes() == by_name[alone.path.name].path.read_bytes(), alone.path.name
    assert len(calls) == 3


def test_target_bpw_takes_a_comma_list(tiny, texts, tmp_path):
    from shortquant.errors import QuantError
    from shortquant.quant.optimize import parse_target_bpw

    assert parse_target_bpw("2.5,3, 6") == (2.5, 3.0, 6.0)
    for bad in ("3,x", "3,3", "0,4", "40"):
        with pytest.raises(QuantError):
            parse_target_bpw(bad)
    bad = run_export(tiny, tmp_path / "bad", "--target-bpw", "4,four", "--calib", str(texts[0]))
    assert bad.exit_code == 2 and "--target-bpw" in bad.stderr and "Traceback" not in bad.stderr


# -- holding some tensors at the standard mix's types ---------------------------------------------
def test_optimize_keep_holds_tensors_at_each_mixs_types(tiny, texts, tmp_path, monkeypatch):
    """--optimize-keep token_embd,output: in every file of a ladder those tensors have exactly
    that file's standard-mix types (q3_k_m and q4_k_m give the embedding different ones), they
    are not probed, each file is within its budget; and the pin holds where the solver, free,
    would spend on them."""
    import dataclasses

    from shortquant.quant import optimize

    kept_names = {"token_embd.weight", "output.weight"}
    measured = []
    real = optimize.measure
    monkeypatch.setattr(optimize, "measure", lambda *a, **k: measured.append(real(*a, **k)) or measured[-1])
    calib, _ = texts
    report = library_export(tiny, tmp_path / "keep", ["q3_k_m", "q4_k_m"], calib, optimize=True,
                            keep=("token_embd", "output"))
    (m,) = measured
    assert not kept_names & set(m.probes) and m.probes   # the blocks are probed, the kept tensors not
    embd_types = set()
    for outcome in report.optimized:
        ref = outcome.target.reference.tensor_types
        path = outcome.file.path
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
        assert {n: types[n] for n in kept_names} == {n: ref[n] for n in kept_names}, path.name
        assert outcome.bytes == path.stat().st_size <= outcome.target.budget
        embd_types.add(ref["token_embd.weight"])
    assert len(embd_types) == 2   # each file its own mix's type, not one type for the ladder

    # the same measurement, the embedding made to look very sensitive: free, the solver upgrades
    # it; kept, it stays at the standard type and the file still fits
    loud = dataclasses.replace(m, coef={**m.coef, "token_embd.weight": m.coef["token_embd.weight"] * 1e6})
    target = report.optimized[0].target
    plan = optimize_plan(tiny)
    base = optimize.OptimizeSettings(calib=calib, quiet=True)
    free, _ = optimize.solve_target(plan, target, loud, base, "x", tmp_path, False)
    kept, _ = optimize.solve_target(plan, target, loud, dataclasses.replace(base, keep=("token_embd",)), "x",
                                    tmp_path, False)
    ref = target.reference.tensor_types["token_embd.weight"]
    assert free.tensor_types["token_embd.weight"] != ref
    assert kept.tensor_types["token_embd.weight"] == ref
    assert optimize.file_bytes(plan, kept) <= target.budget


def optimize_plan(src):
    from shortquant.export import ExportOptions, make_model_plan
    from shortquant.source.checkpoint import open_checkpoint

    return make_model_plan(open_checkpoint(src), ExportOptions())


def test_optimize_keep_names_and_a_tied_embedding(tiny, texts, tmp_path):
    from types import SimpleNamespace

    from shortquant.errors import QuantError
    from shortquant.quant.optimize import kept_tensors, parse_keep

    assert parse_keep("output, ffn_down,output") == ("output", "ffn_down")
    for bad in ("embd", "", "output,blk.0"):
        with pytest.raises(QuantError):
            parse_keep(bad)
    tensors = [SimpleNamespace(name=n) for n in ("token_embd.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight")]
    tied = SimpleNamespace(tensors=tensors)   # no output.weight: the embedding is the output
    assert kept_tensors(tied, ("output",)) == {"token_embd.weight"}
    assert kept_tensors(tied, ("ffn_down",)) == {"blk.0.ffn_down.weight"}
    untied = SimpleNamespace(tensors=tensors + [SimpleNamespace(name="output.weight")])
    assert kept_tensors(untied, ("output",)) == {"output.weight"}
    bad = run_export(tiny, tmp_path / "bad", "-q", "q4_k_m", "--optimize", "--calib", str(texts[0]),
                     "--optimize-keep", "token_embd,embd")
    assert bad.exit_code == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "--optimize-keep: unknown tensor kind 'embd'" in bad.stderr
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").iterdir())
    lone = run_export(tiny, tmp_path / "lone", "-q", "q4_k_m", "--optimize-keep", "output")
    assert lone.exit_code == 2 and "only used with --optimize" in lone.stderr


# -- probing from disk ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory, small_tokenizer):
    """The tiny LLaMA stored in bfloat16, as the big checkpoints streamed probing is for."""
    import torch

    tok_path, vocab = small_tokenizer
    spec = TinySpec(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=vocab, extra={"initializer_range": 0.05})
    model = build_model(spec).to(torch.bfloat16)
    return save_model(model, tmp_path_factory.mktemp("tiny-bf16") / "src", tokenizer_model=tok_path)


def test_probing_from_disk_chooses_the_same_mix(tiny_bf16, texts, tmp_path):
    """--probe-from disk (blocks read from the checkpoint one at a time) and memory measure the
    same numbers (to float rounding), so they choose the same mix."""
    calib, _ = texts
    outcomes, files = {}, {}
    for where in ("memory", "disk"):
        report = library_export(tiny_bf16, tmp_path / where, ["q4_k_m"], calib, optimize=True, probe_from=where)
        (outcome,) = report.optimized
        assert outcome.probe_from == where and outcome.optimized
        outcomes[where], files[where] = outcome, report.files[0].path
    memory, disk = outcomes["memory"], outcomes["disk"]
    assert memory.file.tensor_types == disk.file.tensor_types
    assert disk.kld == pytest.approx(memory.kld, rel=1e-4)
    assert disk.kld_reference == pytest.approx(memory.kld_reference, rel=1e-4)
    assert disk.kld < memory.kld_reference


def test_probe_from_policy():
    from shortquant.errors import QuantError
    from shortquant.quant.probe import probe_from

    assert probe_from("auto", 7_000_000_000) == "disk" and probe_from("auto", 5_000_000) == "memory"
    assert probe_from("memory", 7_000_000_000) == "memory"
    with pytest.raises(QuantError, match="--probe-from"):
        probe_from("bfloat16", 10)


def encode_text_of(model, path):
    from shortquant.tokenizer.encode import encode_text

    return encode_text(model, path.read_text())


@pytest.mark.parametrize("cut", [False, True])
def test_big_models_probe_half_the_kinds_in_sample_blocks(tmp_path, small_tokenizer, cut):
    """With split kinds (the big-model default) the sample blocks alternate between two halves
    of the kinds, while the first and last block and every cut neighbour probe all of them: each
    kind is still probed in at least three blocks of a 12-block model, with fewer probes."""
    from checkpoints import rename_layers
    from shortquant.quant.mixes import tensor_role
    from shortquant.quant.optimize import BLOCK_KINDS, _probed, block_of, cut_distance, probe_plan

    tok_path, vocab = small_tokenizer
    src = save_model(build_model(TinySpec(num_hidden_layers=12, vocab_size=vocab)), tmp_path / "src",
                     tokenizer_model=tok_path)
    if cut:   # stored blocks 0-4 and 8-14: originals 5-7 removed, so blocks 4 and 5 are cut neighbours
        rename_layers(src, {i: i if i < 5 else i + 3 for i in range(12)})
    plan = optimize_plan(src)
    whole, split = probe_plan(plan, 8, False), probe_plan(plan, 8, True)
    assert set(whole) == set(split) and all(k is None for k in whole.values())
    blocks = plan.block_map.block_count
    always = {0, blocks - 1} | {b for b, d in cut_distance(plan).items() if d == 1}
    assert always <= set(split) and all(split[b] is None for b in always)
    sampled = [b for b in sorted(split) if b not in always]
    assert sampled and all(split[b] in (frozenset(BLOCK_KINDS[0::2]), frozenset(BLOCK_KINDS[1::2])) for b in sampled)
    names = [t.name for t in plan.tensors if tensor_role(t.name) in BLOCK_KINDS]
    for kind in BLOCK_KINDS:
        probed_in = {block_of(n) for n in names if tensor_role(n) == kind and _probed(n, split)}
        assert len(probed_in) >= 3 and always <= probed_in
    assert sum(_probed(n, split) for n in names) < sum(_probed(n, whole) for n in names)


def test_big_model_defaults_fill_only_what_is_unset():
    from types import SimpleNamespace

    from shortquant.quant.optimize import SAMPLE_VALUES, OptimizeSettings, _sample_rows, big_model_defaults

    def picked(s):
        return s.probe_chunks, s.probe_ctx, s.split_kinds, s.verify_chunks, s.sample_values

    assert picked(big_model_defaults(OptimizeSettings(calib=Path("c")), 135_000_000)) == (2, 256, False, 2, SAMPLE_VALUES)
    assert picked(big_model_defaults(OptimizeSettings(calib=Path("c")), 7_000_000_000)) == (
        1, 128, True, 1, SAMPLE_VALUES // 2)
    mine = OptimizeSettings(calib=Path("c"), probe_chunks=3, probe_ctx=64, split_kinds=False, verify_chunks=2,
                            sample_values=4096)
    assert picked(big_model_defaults(mine, 7_000_000_000)) == (3, 64, False, 2, 4096)
    # a 7B attention tensor on the big-model sample: 128 evenly spaced rows of 4096
    rows = _sample_rows(SimpleNamespace(n_elements=4096 * 4096, shape=(4096, 4096)), SAMPLE_VALUES // 2)
    assert len(rows) == 128 and set(np.diff(rows)) == {32}
    assert _sample_rows(SimpleNamespace(n_elements=64 * 64, shape=(64, 64)), SAMPLE_VALUES // 2) is None
