"""``shortquant verify DIR|FILE``: are these files the ones that were written, and are they sound?

Checksums come from the folder itself: ``manifest.json`` of ``publish --dry-run`` (its files
under ``upload/``), else the card's "Checksums" table in ``README.md`` (so a folder downloaded
from the hub is checked against what its card says). Every GGUF file is also checked for
structure and data (:func:`shortquant.gguf_check.check_gguf`), listed or not.

    >>> report = verify("gguf/")                     # doctest: +SKIP
    >>> [(r.name, r.ok) for r in report.results]     # doctest: +SKIP
    [('Model-Q8_0.gguf', True), ('README.md', True)]
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import click

from shortquant.errors import GGUFError, PublishError

MANIFEST = "manifest.json"
STAGED = "upload"
# A row of the card's checksum table: | name | bytes | `sha256` |
_CARD_ROW = re.compile(r"^\|\s*([^|`]+?)\s*\|\s*(\d+)\s*\|\s*`([0-9a-f]{64})`\s*\|\s*$")


@dataclass(frozen=True)
class Expected:
    size: int | None
    sha256: str | None


@dataclass
class FileResult:
    name: str
    problem: str | None = None
    checks: list[str] = field(default_factory=list)   # what was checked: "sha256", "gguf"

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass
class VerifyReport:
    root: Path
    source: str            # where the checksums came from, or "" when there were none
    results: list[FileResult]

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if not r.ok]


def read_checksums(folder: Path) -> tuple[Path, dict[str, Expected], str]:
    """(the folder the listed files are in, name -> expected size/sha256, where from)."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            entries = {str(e["path"]): Expected(int(e["size"]), str(e["sha256"]).lower())
                       for e in data["files"]}
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise PublishError(f"not a shortquant manifest ({type(exc).__name__}: {exc})", manifest) from None
        root = folder / STAGED if (folder / STAGED).is_dir() else folder
        return root, entries, MANIFEST
    card = folder / "README.md"
    if card.is_file():
        try:
            text = card.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PublishError(f"cannot read the card ({exc})", card) from None
        rows = {}
        in_table = False
        for line in text.splitlines():
            if line.startswith("## "):
                in_table = line.strip() == "## Checksums"
                continue
            match = _CARD_ROW.match(line) if in_table else None
            if match:
                rows[match.group(1)] = Expected(int(match.group(2)), match.group(3))
        if rows:
            return folder, rows, "README.md checksums"
    return folder, {}, ""


def verify(target: str | Path, progress: bool = False) -> VerifyReport:
    """Check a folder (against its checksums, every GGUF's structure) or one GGUF file."""
    target = Path(target)
    if target.is_file():
        return VerifyReport(target.parent, "", [_check_gguf_file(target, FileResult(target.name))])
    if not target.is_dir():
        raise PublishError("no such file or folder", target)
    root, expected, source = read_checksums(target)
    results: dict[str, FileResult] = {}
    for name, want in expected.items():
        result = results.setdefault(name, FileResult(name))
        path = _inside(root, name)
        if path is None:
            result.problem = "listed path points outside the folder"
        elif not path.is_file():
            result.problem = "missing"
        elif want.size is not None and path.stat().st_size != want.size:
            result.problem = f"has {path.stat().st_size} bytes, expected {want.size}"
        elif want.sha256:
            from shortquant.checksum import sha256_file

            result.checks.append("sha256")
            if sha256_file(path) != want.sha256:
                result.problem = "sha256 does not match (the file was changed or damaged)"
    for path in sorted(root.glob("*.gguf")):
        result = results.setdefault(path.name, FileResult(path.name))
        if result.ok:
            _check_gguf_file(path, result)
    if not results:
        raise PublishError("nothing to verify: no .gguf files and no checksums", target)
    return VerifyReport(root, source, [results[k] for k in sorted(results)])


def _inside(root: Path, name: str) -> Path | None:
    path = (root / name).resolve()
    return path if root.resolve() in path.parents else None


def _check_gguf_file(path: Path, result: FileResult) -> FileResult:
    from shortquant.gguf_check import check_gguf

    try:
        check_gguf(path)
        result.checks.append("gguf")
    except GGUFError as exc:
        message = str(exc)
        result.problem = message.split(": ", 1)[1] if message.startswith(f"{path}: ") else message
    return result


@click.command("verify")
@click.argument("target", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def verify_command(target, as_json):
    """Check TARGET (a folder of GGUF files, or one GGUF file) before using or publishing it.

    A folder is checked against its checksums: manifest.json from `publish --dry-run`, else
    the Checksums table of its README.md (a card written by shortquant, also after a
    download). Every GGUF file's structure is checked (tensor count, offsets, alignment) and
    its tensor data validated as llama.cpp does (ggml_validate_row_data). Exit code 2 when a
    file fails.

    \b
    Examples:
      shortquant verify ./gguf
      shortquant verify ./gguf.staging
      shortquant verify ./gguf/Model-Q4_K_M.gguf
    """
    report = verify(target)
    if as_json:
        click.echo(json.dumps({"target": str(target), "checksums": report.source or None,
                               "files": [{"name": r.name, "ok": r.ok, "problem": r.problem, "checks": r.checks}
                                         for r in report.results]}, indent=2))
    else:
        if Path(target).is_dir() and not report.source:
            click.echo("note: no manifest.json or card checksums here; checking GGUF structure only", err=True)
        for r in report.results:
            click.echo(f"ok    {r.name} ({', '.join(r.checks)})" if r.ok else f"FAIL  {r.name}: {r.problem}")
    raise_if_failed(report, target)


def raise_if_failed(report: VerifyReport, target) -> None:
    """One line for the whole run: how many files failed, and the first one's problem."""
    if report.failed:
        first = report.failed[0]
        raise GGUFError(f"{len(report.failed)} of {len(report.results)} files failed "
                        f"verification ({first.name}: {first.problem})", target)
