"""publish: an interrupted upload resumes (nothing sent twice) and transient errors are retried,
against a local stand-in for the hub API (tests/hub_standin.py); no network."""

from __future__ import annotations

import hashlib

import pytest
from click.testing import CliRunner

from hub_standin import HubStandIn
from publish_helpers import make_gguf
from shortquant.errors import PublishError
from shortquant.publish.upload import publish


@pytest.fixture
def outdir(tmp_path):
    out = tmp_path / "gguf"
    out.mkdir()
    make_gguf(out / "M-5.5B-Q8_0.gguf", "Q8_0")
    make_gguf(out / "M-5.5B-Q4_0.gguf", "Q4_0", seed=1)
    (out / "README.md").write_text("---\nlicense: mit\nbase_model: me/base\n---\n# M\n")
    return out


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
    # The git-LFS upload path (the one a local stand-in can answer); with hf_xet the client takes the
    # Xet path, whose resume works the same way: skip what the server already holds.
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubStandIn() as stand_in:
        yield stand_in


def lfs_oids(outdir):
    return sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in outdir.glob("*.gguf"))


def test_transient_error_is_retried_and_resumes(outdir, hub):
    hub.fail_commits = 2          # the commit fails twice after the files went up
    notes = []
    result = publish(outdir, "me/m-GGUF", progress=False, endpoint=hub.url, retry_wait=0.01,
                     on_warning=notes.append)
    assert not hub.unknown, hub.unknown
    assert len(result.files) == 3
    assert sorted(hub.puts) == lfs_oids(outdir), "an LFS object was uploaded twice"
    assert len(hub.commits) == 1 and set(hub.commits[0]) == {"M-5.5B-Q8_0.gguf", "M-5.5B-Q4_0.gguf", "README.md"}
    retries = [n for n in notes if n.startswith("upload interrupted")]
    assert len(retries) == 2 and "503" in retries[0] and "attempt 2 of 5" in retries[0]


def test_interrupted_upload_resumes_on_the_next_run(outdir, hub):
    hub.fail_commits = 10         # more than the attempts: this run gives up
    with pytest.raises(PublishError, match=r"upload to me/m-GGUF failed: .*503.*run it again to resume"):
        publish(outdir, "me/m-GGUF", progress=False, endpoint=hub.url, attempts=2, retry_wait=0.01)
    sent = list(hub.puts)
    assert sorted(sent) == lfs_oids(outdir) and not hub.commits
    hub.fail_commits = 0
    publish(outdir, "me/m-GGUF", progress=False, endpoint=hub.url, retry_wait=0.01)
    assert hub.puts == sent, "the second run uploaded again what the first one had sent"
    assert len(hub.commits) == 1


def test_permanent_error_is_not_retried(outdir, hub, monkeypatch):
    calls = []
    import huggingface_hub

    original = huggingface_hub.HfApi.create_repo

    def forbidden(self, *args, **kwargs):
        calls.append(1)
        from huggingface_hub.errors import HfHubHTTPError

        class Response:
            status_code = 403
            headers = {}
            text = "forbidden"
            request = None
        raise HfHubHTTPError("403 Forbidden: you cannot write to me/m-GGUF", response=Response())

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", forbidden)
    with pytest.raises(PublishError, match="403 Forbidden"):
        publish(outdir, "me/m-GGUF", progress=False, endpoint=hub.url, retry_wait=0.01)
    assert calls == [1]
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", original)


def test_cli_publish_reports_retries_in_one_line_each(outdir, hub, monkeypatch):
    import shortquant.publish.upload as upload

    real = upload.publish
    monkeypatch.setattr(upload, "publish", lambda *a, **k: real(*a, **k, endpoint=hub.url, retry_wait=0.01))
    hub.fail_commits = 1
    from shortquant.cli import main

    result = CliRunner().invoke(main, ["publish", str(outdir), "--repo", "me/m-GGUF", "--quiet"])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if line] == [
        line for line in result.stderr.splitlines() if line.startswith("warning: upload interrupted")]
    assert "uploaded 3 files" in result.stdout
