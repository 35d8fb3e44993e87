"""publish: --dry-run stages exactly the upload without touching the network; no token, one line."""

from __future__ import annotations

import hashlib
import json
import socket

import click
import pytest
from click.testing import CliRunner

from publish_helpers import make_gguf
from shortquant.errors import PublishError
from shortquant.publish.commands import publish_command
from shortquant.hub import check_repo_id
from shortquant.publish.upload import MANIFEST, STAGED, publish, upload_files


class NetworkUsed(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise NetworkUsed(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return calls


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


@pytest.fixture
def outdir(tmp_path):
    out = tmp_path / "gguf"
    (out / "plots").mkdir(parents=True)
    make_gguf(out / "M-5.5B-Q8_0.gguf", "Q8_0")
    make_gguf(out / "M-5.5B-Q4_0.gguf", "Q4_0", seed=1)
    (out / "README.md").write_text("---\nlicense: mit\n---\n# M\n")
    (out / "plots" / "report.png").write_bytes(b"\x89PNG fake")
    # Never uploaded: hidden folders, unfinished writes.
    (out / ".cache").mkdir()
    (out / ".cache" / "state").write_text("x")
    (out / "M-5.5B-F16.gguf.part").write_bytes(b"partial")
    return out


EXPECTED = ["M-5.5B-Q4_0.gguf", "M-5.5B-Q8_0.gguf", "README.md", "plots/report.png"]


def test_dry_run_stages_folder_and_manifest_without_network(outdir, tmp_path, no_network):
    staging = tmp_path / "staging"
    result = publish(outdir, "me/m-GGUF", private=True, dry_run=True, staging_dir=staging, progress=False)
    assert no_network == []
    manifest = json.loads((staging / MANIFEST).read_text())
    assert manifest["repo"] == "me/m-GGUF" and manifest["private"] is True
    assert [f["path"] for f in manifest["files"]] == EXPECTED
    staged = sorted(p.relative_to(staging / STAGED).as_posix()
                    for p in (staging / STAGED).rglob("*") if p.is_file())
    assert staged == EXPECTED
    for entry in manifest["files"]:
        original = (outdir / entry["path"]).read_bytes()
        assert (staging / STAGED / entry["path"]).read_bytes() == original
        assert entry["size"] == len(original)
        assert entry["sha256"] == hashlib.sha256(original).hexdigest()
    assert manifest["total_bytes"] == sum(f["size"] for f in manifest["files"])
    assert [f.path for f in result.files] == EXPECTED


def test_dry_run_default_staging_is_next_to_the_folder_and_restages_cleanly(outdir, no_network):
    publish(outdir, "me/m-GGUF", dry_run=True, progress=False)
    (outdir / "M-5.5B-Q4_0.gguf").unlink()
    result = publish(outdir, "me/m-GGUF", dry_run=True, progress=False)
    assert result.staging_dir == outdir.with_name("gguf.staging")
    assert not (result.staging_dir / STAGED / "M-5.5B-Q4_0.gguf").exists()
    assert no_network == []


def test_publish_without_token_fails_with_one_line(outdir, no_token, no_network):
    with pytest.raises(PublishError) as info:
        publish(outdir, "me/m-GGUF", progress=False)
    message = str(info.value)
    assert "no Hugging Face token" in message and "\n" not in message
    assert no_network == []


def test_cli_publish_without_token_is_one_line_exit_2(outdir, no_token, no_network):
    from shortquant.cli import _Group

    @click.group(cls=_Group)
    def cli():
        pass

    cli.add_command(publish_command)
    result = CliRunner().invoke(cli, ["publish", str(outdir), "--repo", "me/m-GGUF", "--quiet"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "no Hugging Face token" in result.output


def test_network_failure_is_one_line_and_never_shows_the_token(outdir, monkeypatch, no_network):
    secret = "hf_notarealtokenbutsecret"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    with pytest.raises(PublishError) as info:
        publish(outdir, "me/m-GGUF", progress=False)
    assert no_network, "the upload should have tried to connect"
    assert "upload to me/m-GGUF failed" in str(info.value)
    assert secret not in str(info.value) and "\n" not in str(info.value)


def test_bad_inputs(outdir, tmp_path, no_network):
    for bad in ("no-slash", "a/b/c", "me/", "/x", "me/..", "me/bad name"):
        with pytest.raises(PublishError, match="invalid repo id"):
            check_repo_id(bad)
    with pytest.raises(PublishError, match="staging folder must be outside"):
        publish(outdir, "me/m", dry_run=True, staging_dir=outdir / "stage", progress=False)
    (outdir / "README.md").unlink()
    with pytest.raises(PublishError, match="no README.md"):
        publish(outdir, "me/m", dry_run=True, progress=False)
    with pytest.raises(PublishError, match="not a folder"):
        publish(tmp_path / "missing", "me/m", dry_run=True, progress=False)
    assert [p.as_posix() for p in upload_files(outdir)] == [e for e in EXPECTED if e != "README.md"]
