"""Speed like llama-bench, the GPU message, results.json, the Markdown table, the plot and
the click commands."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from shortquant.errors import BackendError, EvalError
from shortquant.evaluate.report import pareto_front, plot_report
from shortquant.evaluate.results import markdown_table, read_results, write_results



@pytest.fixture
def model(demo_gguf):
    """The embedded demo model as F32 GGUF: a real trained model."""
    pytest.importorskip("llama_cpp")
    return demo_gguf


def test_bench_on_cpu_gives_positive_rates(model):
    from shortquant.evaluate.bench import bench_file

    speed = bench_file(model, n_prompt=32, n_gen=8, reps=3, threads=1)
    assert set(speed) == {"pp32", "tg8", "threads", "gpu_layers", "backend"}
    for key in ("pp32", "tg8"):
        assert speed[key]["mean"] > 0 and speed[key]["std"] >= 0
    assert speed["threads"] == 1 and speed["gpu_layers"] == 0 and speed["backend"] == "CPU"


def test_gpu_layers_without_gpu_backend_says_how_to_install(monkeypatch, model):
    from shortquant.evaluate import bench, llama_backend
    from shortquant.evaluate.commands import bench_command

    monkeypatch.setattr(llama_backend, "supports_gpu_offload", lambda: False)
    with pytest.raises(BackendError) as info:
        bench.bench_file(model, gpu_layers=99)
    message = str(info.value)
    assert "\n" not in message
    assert 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python' in message
    assert BackendError.exit_code == 2
    result = CliRunner().invoke(bench_command, [str(model), "--gpu-layers", "99"])
    assert isinstance(result.exception, BackendError)


def test_real_gpu_flag_matches_the_build():
    pytest.importorskip("llama_cpp")
    from shortquant.evaluate import llama_backend

    import llama_cpp

    assert llama_backend.supports_gpu_offload() == bool(llama_cpp.llama_supports_gpu_offload())
    assert "CPU" in llama_backend.backend_names()


def _fake_results(tmp_path, types, bpw, kld, ppl, name="results.json"):
    files = []
    for t, b, k, p in zip(types, bpw, kld, ppl):
        files.append({"file": f"m-{t}.gguf", "path": str(tmp_path / f"m-{t}.gguf"), "type": t,
                      "bytes": int(b * 1e6), "n_params": 8_000_000, "bpw": b, "ppl": p,
                      "ppl_err": 0.1,
                      "kld": None if k is None else {"mean": k, "err": k / 10, "p99_9": 9 * k,
                                                     "p99": 5 * k, "p95": 3 * k, "p90": 2 * k,
                                                     "median": k / 2, "p10": k / 10, "p5": k / 20,
                                                     "p1": k / 100, "dp_mean": -0.01,
                                                     "dp_rms": 0.05, "same_top1": 0.9},
                      "speed": {"pp512": {"mean": 100.0, "std": 1.0},
                                "tg128": {"mean": 10.0, "std": 0.5},
                                "threads": 2, "gpu_layers": 0, "backend": "CPU"}})
    data = {"shortquant_version": "0", "created": "now", "hardware": {}, "files": files,
            "settings": {"ctx": 512, "text": None, "base": str(tmp_path / "m-F16.gguf")}}
    return write_results(data, tmp_path / name)


def test_results_roundtrip_and_table(tmp_path):
    path = _fake_results(tmp_path, ["F16", "Q8_0", "Q4_K_M"], [16.0, 8.5, 4.9],
                         [None, 0.001, 0.03], [6.0, 6.01, 6.2])
    data = read_results(path)
    table = markdown_table(data).splitlines()
    assert table[0] == "| file | type | size | bpw | PPL | KLD | same top-1 | pp512 t/s | tg128 t/s |"
    assert len(table) == 5
    assert "| m-Q4_K_M.gguf | Q4_K_M |" in table[4] and "6.2000 ± 0.1000" in table[4]
    assert "0.030000 ± 0.003000" in table[4] and "90.00 %" in table[4]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EvalError, match="not a results.json"):
        read_results(bad)


def test_pareto_front():
    # (size, error): (3, 4) is beaten by (2, 3); (4, 1) is the biggest and best
    assert pareto_front([(1, 5), (2, 3), (3, 4), (4, 1)]) == [0, 1, 3]
    assert pareto_front([(1, 1), (2, 2)]) == [0]


def test_report_plot_with_unpruned_series(tmp_path):
    pruned = _fake_results(tmp_path, ["F16", "Q8_0", "Q4_K_M", "Q2_K"], [16, 8.5, 4.9, 2.9],
                           [0.0, 0.001, 0.03, 0.3], [6.0, 6.01, 6.2, 7.5], "pruned.json")
    unpruned = _fake_results(tmp_path, ["F16", "Q4_K_M"], [16, 4.9], [0.0, 0.02], [5.0, 5.1],
                             "unpruned.json")
    from shortquant.evaluate.commands import report_command

    out = tmp_path / "report.png"
    result = CliRunner().invoke(report_command, [str(pruned), "--unpruned", str(unpruned),
                                                 "-o", str(out), "--x", "size"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    # perplexity only (no KLD anywhere): one panel, still drawn
    only_ppl = _fake_results(tmp_path, ["Q8_0"], [8.5], [None], [6.0], "ppl.json")
    assert plot_report([read_results(only_ppl)], tmp_path / "ppl.png").is_file()


def test_eval_command_json_and_results_file(tmp_path, model):
    from shortquant.evaluate.commands import eval_command

    out = tmp_path / "results.json"
    result = CliRunner().invoke(eval_command, [str(model), "--ctx", "64", "--chunks", "4",
                                               "--threads", "1", "--quiet", "--json",
                                               "-o", str(out), "--cache-dir", str(tmp_path / "c"),
                                               "--base", str(model)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data == json.loads(out.read_text())
    assert set(data) == {"shortquant_version", "created", "hardware", "settings", "files"}
    assert {"cpu", "threads", "gpu", "backend", "llama_cpp_version"} <= set(data["hardware"])
    assert data["settings"]["ctx"] == 64 and data["settings"]["chunks"] == 4
    assert set(data["settings"]["text"]) == {"path", "sha256", "tokens"}
    entry = data["files"][0]
    assert entry["file"] == model.name and entry["type"] == "F32"
    assert entry["kld"]["same_top1"] == 1.0 and entry["speed"] is None
    assert entry["n_params"] == 4_984_064 and entry["bytes"] == model.stat().st_size  # models/README.md
