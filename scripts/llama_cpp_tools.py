#!/usr/bin/env python3
"""Build llama.cpp's command-line tools from the installed llama-cpp-python's source package.

Benchmarks and cross-checks compare shortquant with llama.cpp's own pipeline
(``convert_hf_to_gguf.py`` + ``llama-quantize``, ``llama-perplexity``). Those tools are not part
of the llama-cpp-python wheel, so this helper fetches the sdist of the *installed* version
(the same llama.cpp commit as the ``libggml`` we quantize with), configures a CPU Release build
and builds only the targets asked for, into a cache folder that is never committed.

    from llama_cpp_tools import ensure_tools
    tools = ensure_tools(("llama-quantize",))
    tools.binaries["llama-quantize"]     # Path to the executable
    tools.convert_script                 # .../convert_hf_to_gguf.py
    tools.convert_env()                  # os.environ with that source's gguf-py first on PYTHONPATH

    python scripts/llama_cpp_tools.py llama-quantize llama-perplexity   # build from the shell

Cross-checks that only use a tool already built (the tests) look it up with :func:`cached_tool`
and run ``llama-perplexity`` through :func:`run_llama_perplexity` / :func:`run_llama_kld`.

A build that already has the binaries is reused, also one made by another helper (any
``build/bin`` under ``~/.cache/shortquant`` or ``/tmp/llsrc`` configured from the same version).
If another cmake build is running, this waits for it instead of compiling the same sources twice.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # run from a checkout: the shortquant beside scripts/, as the other scripts
    sys.path.insert(0, str(REPO))

from shortquant.resources import cache_root  # noqa: E402

DEFAULT_TARGETS = ("llama-quantize", "llama-perplexity")
LOCAL_SOURCES = Path("/tmp/llsrc")  # where a session may already have unpacked the sdist
# The CPU features of the llama-cpp-python build we compare with: AVX2 without -march=native
# (native enables AMX on CPUs that have it, and AMX traps in some VMs; the tools and the
# Python library must also run the same kernels for timings to be comparable).
CPU_OPTIONS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_BMI2=ON", "-DGGML_FMA=ON",
               "-DGGML_F16C=ON"]
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    *CPU_OPTIONS,
    "-DLLAMA_CURL=OFF",  # deprecated in newer llama.cpp, harmless there
    "-DLLAMA_OPENSSL=OFF",  # no network features needed; avoids an OpenSSL dependency
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries, independent of the Python package's libs
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
]


@dataclass
class LlamaCppTools:
    """Paths of a built llama.cpp: the requested binaries, the converter and its gguf-py."""

    source: Path  # the vendored llama.cpp folder
    binaries: dict[str, Path] = field(default_factory=dict)

    @property
    def convert_script(self) -> Path:
        return self.source / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.source / "gguf-py"

    def convert_env(self) -> dict[str, str]:
        """Environment for running convert_hf_to_gguf.py with its own gguf-py, as llama.cpp does."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.gguf_py)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return env


def installed_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def default_cache(version: str) -> Path:
    return cache_root() / f"llama.cpp-{version}"


def _vendored(folder: Path) -> Path | None:
    found = sorted(folder.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    return found[0].parent if found else None


def fetch_source(version: str, cache: Path) -> Path:
    """Return the vendored llama.cpp folder of llama-cpp-python ``version``, fetching it if needed.

    Order: already unpacked in ``cache``; a copy of ``/tmp/llsrc/llama_cpp_python-<version>``;
    ``pip download`` of the sdist into ``cache`` and unpack.
    """
    cache.mkdir(parents=True, exist_ok=True)
    src = _vendored(cache)
    if src:
        return src
    local = LOCAL_SOURCES / f"llama_cpp_python-{version}"
    if (local / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        # A copy, so the cache stays valid when /tmp is cleaned.
        shutil.copytree(local, cache / local.name, symlinks=True)
    else:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(cache)], check=True)
        archives = sorted(cache.glob(f"llama_cpp_python-{version}.tar.gz"))
        if not archives:
            raise RuntimeError(f"{cache}: pip download gave no llama-cpp-python {version} sdist")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(cache, filter="data")
    src = _vendored(cache)
    if src is None:
        raise RuntimeError(f"{cache}: the llama-cpp-python {version} sdist has no vendor/llama.cpp")
    return src


def _cmake_cache(build: Path) -> dict[str, str]:
    values = {}
    path = build / "CMakeCache.txt"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            if "=" in line and ":" in line.split("=", 1)[0] and not line.startswith(("//", "#")):
                key, value = line.split("=", 1)
                values[key.split(":", 1)[0]] = value
    return values


def _compatible(build: Path, version: str) -> bool:
    """A build folder configured for CPU Release from llama-cpp-python ``version``'s source,
    with :data:`CPU_OPTIONS`."""
    conf = _cmake_cache(build)
    home = conf.get("CMAKE_HOME_DIRECTORY", "")
    cpu = all(conf.get(o[2:].split("=")[0]) == o.split("=")[1] for o in CPU_OPTIONS)
    return (f"llama_cpp_python-{version}" in home and conf.get("CMAKE_BUILD_TYPE") == "Release"
            and cpu and conf.get("GGML_CUDA", "OFF") == "OFF" and Path(home, "CMakeLists.txt").is_file())


def candidate_builds(version: str, cache: Path) -> list[Path]:
    """Build folders to reuse, ours first, then other helpers' of the same version."""
    found = [cache / "build"]
    for root in (cache_root(), LOCAL_SOURCES):
        if root.is_dir():
            found += sorted(p.parent for p in root.glob("*/build/CMakeCache.txt"))
            found += sorted(p.parent for p in root.glob("*/*/build/CMakeCache.txt"))
            found += sorted(p.parent for p in root.glob("*/vendor/llama.cpp/build*/CMakeCache.txt"))
    unique = []
    for build in found:
        if build not in unique and (build == cache / "build" or _compatible(build, version)):
            unique.append(build)
    return unique


def cmake_running() -> bool:
    """True while some cmake/make/compiler process is running on this machine (anyone's)."""
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = os.path.basename(cmd[0].decode(errors="replace")) if cmd and cmd[0] else ""
        if name in ("cmake", "make", "gmake", "cc1", "cc1plus", "ninja"):
            return True
    return False


def wait_for_other_builds(poll_s: float = 20.0, limit_s: float = 1800.0, log=print) -> None:
    """Wait until no cmake build is running, so two builds never fight over 2 cores."""
    start = time.monotonic()
    announced = False
    while cmake_running() and time.monotonic() - start < limit_s:
        if not announced:
            log("another llama.cpp build is running; waiting for it to finish to reuse its output")
            announced = True
        time.sleep(poll_s)


def _binary(build: Path, target: str) -> Path | None:
    path = build / "bin" / target
    return path if path.is_file() and os.access(path, os.X_OK) else None


def ensure_tools(targets=DEFAULT_TARGETS, cache: str | Path | None = None, jobs: int = 2,
                 log=print) -> LlamaCppTools:
    """Return llama.cpp's ``targets`` for the installed llama-cpp-python, building what is missing.

    >>> tools = ensure_tools(("llama-quantize",))        # doctest: +SKIP
    >>> subprocess.run([tools.binaries["llama-quantize"], "f16.gguf", "q4.gguf", "Q4_K_M"])  # doctest: +SKIP
    """
    version = installed_version()
    cache = Path(cache) if cache else default_cache(version)
    wait_for_other_builds(log=log)
    source = fetch_source(version, cache)
    tools = LlamaCppTools(source=source)

    builds = candidate_builds(version, cache)
    missing = []
    for target in targets:
        path = next((b for b in (_binary(build, target) for build in builds) if b), None)
        if path:
            tools.binaries[target] = path
        else:
            missing.append(target)
    if not missing:
        return tools

    # Build the rest in an existing compatible folder when there is one (ggml and libllama are
    # then already compiled, so only the tools' own sources remain), else in our cache.
    existing = [b for b in builds if (b / "CMakeCache.txt").is_file()]
    build = existing[0] if existing else cache / "build"
    if not existing:
        log(f"configuring llama.cpp {version} in {build}")
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], check=True,
                       stdout=subprocess.DEVNULL)
    log(f"building {', '.join(missing)} in {build} (-j{jobs}; minutes on a small machine)")
    subprocess.run(["cmake", "--build", str(build), "--config", "Release", f"-j{jobs}",
                    "--target", *missing], check=True, stdout=subprocess.DEVNULL)
    for target in missing:
        path = _binary(build, target)
        if path is None:
            raise RuntimeError(f"{build}: the build finished without {target}")
        tools.binaries[target] = path
    return tools


def cached_tool(version: str | None = None, name: str = "llama-perplexity") -> Path | None:
    """The llama.cpp tool ``name`` (llama-perplexity, llama-imatrix, ...) already built for the
    installed llama-cpp-python (by :func:`ensure_tools`, or into the older
    ``llama-perplexity-<version>`` folder), or None; builds nothing."""
    version = version or installed_version()
    builds = candidate_builds(version, default_cache(version))
    builds.append(cache_root() / f"llama-perplexity-{version}" / "build")
    return next((path for path in (_binary(build, name) for build in builds) if path), None)


# The lines of llama-perplexity's output the cross-checks read.
FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
KLD_MEAN = re.compile(r"Mean\s+KLD:\s+(-?[0-9.]+) ±\s+([0-9.]+)")
SAME_TOP = re.compile(r"Same top p:\s+([0-9.]+) ±")


def _run(cmd: list[str], wanted: re.Pattern) -> str:
    for _attempt in range(3):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        # llama.cpp logs from a worker thread; now and then its last lines are lost at exit
        if wanted.search(output) or proc.returncode != 0:
            break
    if proc.returncode != 0 or not wanted.search(output):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}): {' / '.join(tail)}")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", default=list(DEFAULT_TARGETS))
    parser.add_argument("--cache", help="cache folder (default ~/.cache/shortquant/llama.cpp-<version>)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    tools = ensure_tools(tuple(args.targets), args.cache, args.jobs)
    for name, path in tools.binaries.items():
        print(f"{name}: {path}")
    print(f"convert_hf_to_gguf.py: {tools.convert_script}")
    print(f"gguf-py: {tools.gguf_py}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
