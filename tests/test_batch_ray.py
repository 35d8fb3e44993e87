"""`shortquant batch --ray`: a real local Ray instance and a simulated two-node cluster write the
same files, byte for byte, as local mode; a failing model is isolated the same way.

Skipped when Ray is not installed (`pip install 'shortquant[ray]'`).
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from batch_helpers import gguf_bytes, make_checkpoints, write_jobs
from shortquant.batch import load_jobs, run_batch
from shortquant.cli import main
from shortquant.export import resolve_source

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, small_tokenizer):
    """The demo model plus two tiny checkpoints (one failing), 3 types each, run in local mode."""
    root = tmp_path_factory.mktemp("ray")
    ckpt = make_checkpoints(root / "ckpt", small_tokenizer)
    jobs = write_jobs(root / "jobs.yaml", f"""
quants: [q8_0, q4_k_m, q2_k]
models:
  - source: {resolve_source(None)[0]}
    recipe: shortquant-demo
  - source: {ckpt['tiny-a']}
  - source: {ckpt['tiny-nan']}
""")
    local = run_batch(load_jobs(jobs), root / "local", workers=1)
    assert [o.ok for o in local.outcomes] == [True, True, False]
    return root, jobs


def _same_as_local(root, out, report):
    assert [o.folder for o in report.outcomes] == ["demo", "tiny-a", "tiny-nan"]
    assert [o.ok for o in report.outcomes] == [True, True, False]
    assert "NaN/Inf" in report.outcomes[2].reason
    assert report.exit_code == 2
    assert gguf_bytes(out) == gguf_bytes(root / "local")
    assert len(gguf_bytes(out)) == 6


def test_local_ray_instance_same_bytes_as_local_mode(catalogue):
    root, jobs = catalogue
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = root / "ray-local"
        result = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(out), "--ray", "auto", "--quiet"])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines()[-1].startswith("error: tiny-nan: export: ")
        report = run_batch(load_jobs(jobs), out, ray="auto")   # a rerun on Ray skips everything
        assert all(o.made == [] for o in report.outcomes[:2])
        _same_as_local(root, out, report)
    finally:
        ray.shutdown()


def test_two_node_cluster_same_bytes_as_local_mode(catalogue):
    from ray.cluster_utils import Cluster

    root, jobs = catalogue
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        out = root / "ray-cluster"
        report = run_batch(load_jobs(jobs), out, ray="auto")
        _same_as_local(root, out, report)
        assert all(o.made for o in report.outcomes[:2])
        nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert len(nodes) == 2
        assert {node for o in report.outcomes for node in o.nodes} == nodes   # both nodes worked
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_no_cluster_to_join_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    jobs = write_jobs(tmp_path / "jobs.yaml", f"models:\n  - source: {resolve_source(None)[0]}\n")
    result = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(tmp_path / "out"), "--ray", "auto"])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("error: cannot reach a Ray cluster at 'auto'") and "\n" not in line
