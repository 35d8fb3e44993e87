"""Publish a folder to the Hugging Face Hub, or stage exactly what would be published.

What goes up is every regular file in the folder and its subfolders, except hidden ones
(``.cache``, ``.git``, ...), unfinished writes (``*.part``) and Python caches. ``--dry-run``
makes no network call at all: it copies (hard-links when it can) those files into a staging
folder, laid out as they would be in the repo, and writes a manifest of path, size and sha256.

The token comes from ``HF_TOKEN`` or the stored hub login (``huggingface_hub.get_token``); it is
passed to the client and never printed, logged or written anywhere by us.

    >>> from shortquant.publish.upload import publish
    >>> publish("out/st-vicuna", "me/st-vicuna-GGUF", dry_run=True)     # doctest: +SKIP
    PublishResult(repo='me/st-vicuna-GGUF', ...)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from shortquant.errors import OutputError, PublishError
from shortquant.hub import check_repo_id

MANIFEST = "manifest.json"
STAGED = "upload"
_SKIP_SUFFIXES = (".part", ".pyc", ".tmp")


@dataclass(frozen=True)
class UploadFile:
    path: str        # relative, with forward slashes: the path in the repo
    size: int
    sha256: str | None   # None after a real upload (not re-read)


@dataclass
class PublishResult:
    repo: str
    files: list[UploadFile]
    dry_run: bool
    staging_dir: Path | None = None
    url: str | None = None

    def to_json(self) -> dict:
        return {"repo": self.repo, "dry_run": self.dry_run, "url": self.url,
                "staging_dir": str(self.staging_dir) if self.staging_dir else None,
                "files": [f.__dict__ for f in self.files],
                "total_bytes": sum(f.size for f in self.files)}


def upload_files(outdir: str | Path) -> list[Path]:
    """The files ``publish`` would upload from ``outdir``, relative to it, sorted."""
    outdir = Path(outdir)
    chosen = []
    for path in sorted(outdir.rglob("*")):
        rel = path.relative_to(outdir)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        if path.is_symlink() or not path.is_file() or path.name.endswith(_SKIP_SUFFIXES):
            continue
        chosen.append(rel)
    return chosen


def _stage(outdir: Path, files: list[Path], staging_dir: Path, progress: bool) -> list[UploadFile]:
    from tqdm import tqdm

    from shortquant.checksum import sha256_file

    target = staging_dir / STAGED
    if target.exists():
        shutil.rmtree(target)
    entries = []
    total = sum((outdir / rel).stat().st_size for rel in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="stage", disable=not progress) as bar:
        for rel in files:
            src, dst = outdir / rel, target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)   # same bytes, no copy of multi-GB files
            except OSError:
                shutil.copy2(src, dst)
            entries.append(UploadFile(rel.as_posix(), dst.stat().st_size, sha256_file(dst, bar)))
    return entries


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    return token


def publish(outdir: str | Path, repo: str, private: bool = False, dry_run: bool = False,
            staging_dir: str | Path | None = None, *, progress: bool = True,
            commit_message: str | None = None, on_warning=None, attempts: int = 5,
            retry_wait: float = 5.0, endpoint: str | None = None) -> PublishResult:
    """Upload ``outdir`` to the model repo ``repo`` (created if missing), or stage it (``dry_run``).

    A dry run writes ``staging_dir/upload/`` (the files, as laid out in the repo) and
    ``staging_dir/manifest.json``; ``staging_dir`` defaults to ``<outdir>.staging`` next to
    ``outdir``. A real upload with ``huggingface_hub.upload_folder`` skips files the hub already
    holds, so running it again after an interruption resumes it; transient errors (5xx, 429,
    dropped connections) are retried that way up to ``attempts`` times, waiting ``retry_wait``
    seconds and twice as long each time. ``on_warning(text)`` hears about a card without
    base_model/license and about each retry; ``endpoint`` overrides the hub's address.

        >>> publish("out/st-vicuna", "me/st-vicuna-GGUF", private=True)   # doctest: +SKIP
    """
    outdir = Path(outdir)
    check_repo_id(repo)
    if not outdir.is_dir():
        raise PublishError("not a folder", outdir)
    files = upload_files(outdir)
    if not files:
        raise PublishError("nothing to upload", outdir)
    if not (outdir / "README.md").is_file():
        raise PublishError("no README.md; write the model card first with `shortquant card`", outdir)
    token = None if dry_run else _token()   # a missing token fails before anything else is said
    if on_warning is not None:
        from shortquant.publish.card import card_warnings

        for warning in card_warnings(outdir / "README.md"):
            on_warning(warning)

    if dry_run:
        staging = Path(staging_dir) if staging_dir is not None else outdir.with_name(outdir.name + ".staging")
        if staging.resolve() == outdir.resolve() or outdir.resolve() in staging.resolve().parents:
            raise PublishError("the staging folder must be outside the folder to publish", staging)
        try:
            staging.mkdir(parents=True, exist_ok=True)
            entries = _stage(outdir, files, staging, progress)
            manifest = {"repo": repo, "repo_type": "model", "private": private,
                        "files": [e.__dict__ for e in entries],
                        "total_bytes": sum(e.size for e in entries)}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        except OSError as exc:
            raise OutputError(f"cannot stage the upload: {exc.strerror or exc}", staging) from None
        return PublishResult(repo=repo, files=entries, dry_run=True, staging_dir=staging)

    from huggingface_hub import HfApi

    api = HfApi(token=token, endpoint=endpoint)
    allow = [rel.as_posix() for rel in files]

    def upload():
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(outdir), allow_patterns=allow,
                          commit_message=commit_message or "Upload GGUF files with shortquant")
        return url

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not progress:   # --quiet silences the hub client's bars too
        disable_progress_bars()
    try:
        url = _with_retries(upload, repo, attempts, retry_wait, on_warning)
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    entries = [UploadFile(rel.as_posix(), (outdir / rel).stat().st_size, None) for rel in files]
    return PublishResult(repo=repo, files=entries, dry_run=False, url=str(url))


# Server answers worth another try: rate limiting and the 5xx family (the hub's load balancers).
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def _is_transient(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        return getattr(response, "status_code", None) in _TRANSIENT_STATUS
    # Connection refused/reset, timeouts, DNS hiccups: httpx and requests errors, or plain OSError.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectionError", "TimeoutException", "Timeout", "NetworkError", "TransportError",
                         "RemoteProtocolError", "ProtocolError", "TimeoutError"})


def _with_retries(upload, repo: str, attempts: int, wait: float, on_warning):
    """Run ``upload`` until it succeeds, up to ``attempts`` times on transient errors.

    Each new attempt re-runs the whole upload, which resumes it: huggingface_hub skips what the
    hub already holds (files already committed, LFS/Xet data already uploaded).
    """
    import time

    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(1, attempts + 1):
        try:
            return upload()
        except Exception as exc:
            # The server's message, never the request headers (they hold the token).
            reason = _first_line(exc) if isinstance(exc, HfHubHTTPError) else f"{type(exc).__name__}: {_first_line(exc)}"
            if not _is_transient(exc) or attempt == attempts:
                again = " (run it again to resume)" if _is_transient(exc) else ""
                raise PublishError(f"upload to {repo} failed: {reason}{again}") from None
            if on_warning is not None:
                on_warning(f"upload interrupted ({reason}); resuming, attempt {attempt + 1} of {attempts}")
            time.sleep(wait * 2 ** (attempt - 1))
