"""llama.cpp's own ``llama-perplexity``, built from the installed llama-cpp-python's source
package and cached, to check our numbers against the reference tool.

Example::

    tool = cached_tool()                       # None until built once
    tool = tool or build_tool(jobs=2)          # pip download + cmake (minutes)
    print(run_llama_perplexity(tool, "m.gguf", "text.txt", ctx=128))   # (ppl, err)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from shortquant.errors import BackendError

TOOL = "llama-perplexity"
FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
KLD_MEAN = re.compile(r"Mean\s+KLD:\s+(-?[0-9.]+) ±\s+([0-9.]+)")
SAME_TOP = re.compile(r"Same top p:\s+([0-9.]+) ±")


def installed_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def tool_dir(version: str | None = None) -> Path:
    root = os.environ.get("SHORTQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shortquant")
    return Path(root) / f"{TOOL}-{version or installed_version()}"


def cached_tool(version: str | None = None, name: str = TOOL) -> Path | None:
    """The cached llama.cpp tool ``name`` (llama-perplexity, llama-imatrix, ...) built for the
    installed version, or None: from :func:`build_tool`'s folder or from the one
    ``scripts/llama_cpp_tools.py`` builds into (``llama.cpp-<version>``)."""
    version = version or installed_version()
    for folder in (tool_dir(version), tool_dir(version).with_name(f"llama.cpp-{version}")):
        path = folder / "build" / "bin" / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def fetch_source(version: str, into: Path) -> Path:
    """Download and unpack the llama-cpp-python sdist; return its vendored llama.cpp folder."""
    into.mkdir(parents=True, exist_ok=True)
    found = list(into.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(into)], check=True)
        archives = sorted(into.glob("llama_cpp_python-*.tar.gz"))
        if not archives:
            raise BackendError(f"pip download gave no llama-cpp-python {version} source archive", into)
        with tarfile.open(archives[-1]) as tar:
            tar.extractall(into, filter="data")
        found = list(into.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        raise BackendError("the source package has no vendor/llama.cpp", into)
    return found[0].parent


def build_tool(source: str | Path | None = None, version: str | None = None, jobs: int = 2) -> Path:
    """Configure and build only the llama-perplexity target (CPU, static) into the cache."""
    version = version or installed_version()
    folder = tool_dir(version)
    src = Path(source) if source else fetch_source(version, folder / "src")
    if not (src / "CMakeLists.txt").is_file():
        raise BackendError("not a llama.cpp source folder (no CMakeLists.txt)", src)
    build = folder / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_BUILD_APP=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", TOOL, f"-j{jobs}"], check=True)
    tool = cached_tool(version)
    if tool is None:
        raise BackendError(f"the build finished without {TOOL}", build)
    return tool


def _run(cmd: list[str], wanted: re.Pattern) -> str:
    for _attempt in range(3):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        # llama.cpp logs from a worker thread; now and then its last lines are lost at exit
        if wanted.search(output) or proc.returncode != 0:
            break
    if proc.returncode != 0 or not wanted.search(output):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BackendError(f"{TOOL} failed (exit {proc.returncode}): {' / '.join(tail)}")
    return output


def run_llama_perplexity(tool: str | Path, model: str | Path, text: str | Path, ctx: int,
                         threads: int | None = None, extra: list[str] | None = None) -> tuple[float, float]:
    """Run llama-perplexity and return the (PPL, error) of its "Final estimate" line."""
    cmd = [str(tool), "-m", str(model), "-f", str(text), "-c", str(ctx)]
    cmd += ["-t", str(threads)] if threads else []
    found = FINAL.search(_run(cmd + (extra or []), FINAL))
    return float(found.group(1)), float(found.group(2))


def run_llama_kld(tool: str | Path, model: str | Path, base: str | Path, text: str | Path, ctx: int,
                  logits_file: str | Path, threads: int | None = None) -> dict:
    """llama-perplexity's KL-divergence mode: {"mean", "err", "same_top1"} of model vs base."""
    common = ["-f", str(text), "-c", str(ctx), "--kl-divergence-base", str(logits_file)]
    common += ["-t", str(threads)] if threads else []
    _run([str(tool), "-m", str(base), *common], FINAL)
    output = _run([str(tool), "-m", str(model), *common, "--kl-divergence"], SAME_TOP)
    mean = KLD_MEAN.search(output)
    return {"mean": float(mean.group(1)), "err": float(mean.group(2)),
            "same_top1": float(SAME_TOP.search(output).group(1)) / 100}
