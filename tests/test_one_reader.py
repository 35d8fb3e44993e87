"""One reading of a checkpoint (issue 20): ``imatrix FOLDER``, ``eval --base FOLDER`` and
``--optimize``'s probes run the model ``export`` writes, in every layout and family.

For each layout the export tests cover and each family, the folder is exported to F32 and then:
``eval F32.gguf --base FOLDER`` must find the file and its source the same model (mean KLD below
1e-5), ``imatrix FOLDER`` (torch) must have exactly the entries of ``imatrix F32.gguf``
(llama.cpp's forward) within 1e-3 relative, and the calibration tokens must be llama.cpp's on
the exported file. A folder whose tensors disagree with the model is a one-line error from all
three jobs, with nothing written.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from reader_cases import CASES, TEXT, llama
from shortquant.cli import main
from test_eval_hf_base import one_torch_thread  # noqa: F401  (autouse: one torch thread, small machines)

pytest.importorskip("llama_cpp")

CTX, CHUNKS = 32, 2


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def stand_ins(src, extra) -> set[str]:
    """The zero tensors export writes for llama.cpp's deci where the source has none (deci.py)."""
    from shortquant.export import ExportOptions, make_model_plan
    from shortquant.source.checkpoint import open_checkpoint

    plan = make_model_plan(open_checkpoint(src), ExportOptions(pad_ffn=0, pre=extra[1] if extra else None))
    return {t.name for t in plan.tensors if t.fill is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_jobs_run_the_model_export_writes(tmp_path, case):
    from shortquant.quant.imatrix import read_imatrix
    from shortquant.quant.imatrix_llama import gguf_tokens
    from shortquant.tokenizer.encode import encode_text

    src = tmp_path / "src"
    extra = CASES[case](src)
    run("export", src, "--out", tmp_path / "out", "-q", "f32", "--pad-ffn", "0", "--quiet", *extra)
    (f32,) = (tmp_path / "out").glob("*-F32.gguf")

    # the calibration tokens are llama.cpp's on the exported file (BOS / EOS as its add_*_token)
    ids, bos = encode_text(src, TEXT)
    assert ids == gguf_tokens(f32, TEXT).tolist()
    assert (bos is not None) == (ids[0] == bos)

    result = run("eval", f32, "--base", src, "--ctx", 64, "--chunks", 2, "--threads", 1,
                 "--cache-dir", tmp_path / "cache", "--json", "--quiet")
    kld = json.loads(result.stdout)["files"][0]["kld"]
    assert kld["mean"] < 1e-5, kld
    assert kld["same_top1"] >= 0.98, kld   # a near-tie may flip (bf16 weights: 1 of 124)

    text = tmp_path / "calib.txt"
    text.write_text(TEXT, encoding="utf-8")
    ims = {}
    for name, model in (("torch", src), ("llama", f32)):
        run("imatrix", model, "--text", text, "-o", tmp_path / f"{name}.imatrix.gguf", "--ctx", CTX,
            "--chunks", CHUNKS, "--threads", 1, "--quiet")
        ims[name] = read_imatrix(tmp_path / f"{name}.imatrix.gguf")
    ours, theirs = ims["torch"], ims["llama"]
    assert set(ours.sums) == set(theirs.sums) - stand_ins(src, extra)
    assert len(ours.sums) >= 10
    for name in ours.sums:
        assert ours.counts[name].tolist() == theirs.counts[name].tolist() == [CTX * CHUNKS], name
        a, b = ours.sums[name], theirs.sums[name]
        # each entry within 1e-3 (L2); single values within 5e-3: llama.cpp's f16 KV cache (with an F32
        # cache and no flash attention they agree to 3e-6: scripts/reader_matrix.py)
        assert np.linalg.norm(a - b) < 1e-3 * np.linalg.norm(b), name
        np.testing.assert_allclose(a, b, rtol=5e-3, atol=0, err_msg=name)


def test_calibration_tokens_follow_the_exported_files_bos_and_eos(tmp_path):
    """A sentencepiece folder that asks for no BOS and an EOS: llama.cpp tokenizes the export so,
    and so must the calibration text of ``imatrix FOLDER`` and the probes."""
    from shortquant.quant.imatrix_llama import gguf_tokens
    from shortquant.tokenizer.encode import encode_text

    src = tmp_path / "src"
    llama(src, layers=1)
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True}))
    run("export", src, "--out", tmp_path / "out", "-q", "f32", "--quiet")
    (f32,) = (tmp_path / "out").glob("*-F32.gguf")
    ids, bos = encode_text(src, TEXT)
    assert bos is None and ids[-1] == 2 and ids[0] != 1
    assert ids == gguf_tokens(f32, TEXT).tolist()


# --- bad input: one line, exit 2, nothing written, from every job alike --------------------------------

def _edit_tensors(folder, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def missing_k_proj(tensors):
    del tensors["model.layers.1.self_attn.k_proj.weight"]


def extra_block(tensors):
    for name in [n for n in tensors if n.startswith("model.layers.3.")]:
        tensors[name.replace(".3.", ".4.", 1)] = tensors[name].clone()


def leftover_tensor(tensors):
    tensors["model.layers.2.mlp.gate_proj.lora_A.weight"] = torch.zeros(8, 64)


def wrong_head(tensors):
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:500].clone()


BAD = {
    # name: (edit, what the one line must say)
    "missing-k_proj": (missing_k_proj, ["block 1", "'self_attn.k_proj.weight'"]),
    "extra-block": (extra_block, ["num_hidden_layers=4", "5 blocks"]),
    "leftover-tensor": (leftover_tensor, ["block 2", "'model.layers.2.mlp.gate_proj.lora_A.weight'"]),
    "wrong-lm_head": (wrong_head, ["'lm_head.weight'", "[500, 64]"]),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A contiguous checkpoint, its F32 export and a calibration text."""
    tmp = tmp_path_factory.mktemp("one_reader_bad")
    llama(tmp / "src")
    run("export", tmp / "src", "--out", tmp / "out", "-q", "f32", "--quiet")
    text = tmp / "calib.txt"
    text.write_text(TEXT, encoding="utf-8")
    return tmp / "src", next((tmp / "out").glob("*-F32.gguf")), text


def one_line(result, src, fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in [str(src), *fragments]:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("bad", list(BAD))
def test_a_folder_that_disagrees_with_the_model_is_one_error_from_every_job(tmp_path, good, bad):
    good_src, f32, text = good
    edit, fragments = BAD[bad]
    src = shutil.copytree(good_src, tmp_path / "src")
    _edit_tensors(src, edit)
    out = tmp_path / "written"
    jobs = {
        "imatrix": ["imatrix", src, "--text", text, "-o", out / "m.imatrix.gguf", "--ctx", CTX],
        "eval --base": ["eval", f32, "--base", src, "--ctx", 64, "--cache-dir", out / "cache", "-o",
                        out / "results.json", "--quiet"],
        "--optimize": ["export", src, "--out", out / "gguf", "-q", "q4_k_m", "--optimize", "--calib", text,
                       "--quiet"],
    }
    if bad == "wrong-lm_head":   # export's plan refuses it before any probe: so must the torch model
        jobs["export"] = ["export", src, "--out", out / "gguf", "-q", "f32", "--quiet"]
    for job, args in jobs.items():
        one_line(run(*args, code=2), src, fragments)
        written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
        assert not written, (job, written)
