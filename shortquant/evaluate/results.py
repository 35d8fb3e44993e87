"""results.json: one file per evaluation run, and its Markdown table.

Schema::

    {"shortquant_version", "created",
     "hardware": {"cpu", "threads", "gpu", "backend", "llama_cpp_version", "llama_cpp_build",
                  "system_info"},
     "settings": {"ctx", "chunks", "text": {"path", "sha256", "tokens"}, "base"},
     "files": [{"file", "path", "type", "bytes", "n_params", "bpw", "ppl", "ppl_err",
                "kld": {"mean", "err", "p99_9", "p99", "p95", "p90", "median", "p10", "p5",
                        "p1", "dp_mean", "dp_rms", "same_top1"} | null,
                "speed": {"pp512": {"mean", "std"}, "tg128": {"mean", "std"},
                          "threads", "gpu_layers", "backend"} | null}]}

Example::

    data = read_results("results.json")
    print(markdown_table(data))
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

from shortquant.errors import EvalError
from shortquant.partfiles import write_atomic
from shortquant.sizes import format_size

FILE_KEYS = ("file", "path", "type", "bytes", "n_params", "bpw", "ppl", "ppl_err", "kld", "speed")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name when nvidia-smi is there, else None."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if names else None


def hardware_info(threads: int | None, gpu_layers: int = 0) -> dict:
    """What the numbers were measured on."""
    from shortquant.evaluate import llama_backend
    from shortquant.evaluate.bench import backend_for

    build = llama_backend.build_info()
    backend = backend_for(gpu_layers)
    return {
        "cpu": cpu_name(),
        "threads": threads or os.cpu_count(),
        "gpu": gpu_name() if backend != "CPU" else None,
        "backend": backend,
        "llama_cpp_version": build.get("llama_cpp_python"),
        "llama_cpp_build": {k: v for k, v in build.items() if k != "llama_cpp_python"},
        "system_info": llama_backend.system_info(),
    }


def make_results(files: list[dict], settings: dict, hardware: dict) -> dict:
    from shortquant import __version__

    return {
        "shortquant_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware,
        "settings": settings,
        "files": files,
    }


def write_results(data: dict, path: str | Path) -> Path:
    """Write results.json atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(data, indent=2) + "\n")


def read_results(path: str | Path) -> dict:
    """Load and sanity-check a results.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvalError("results file not found", path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalError(f"not a results.json ({exc})", path)
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise EvalError("not a results.json (no 'files' list)", path)
    for entry in data["files"]:
        missing = [k for k in ("file", "type", "bytes") if k not in entry]
        if missing:
            raise EvalError(f"results entry lacks {', '.join(missing)}", path)
    return data


def _speed_keys(files: list[dict]) -> list[str]:
    keys = []
    for entry in files:
        for key in (entry.get("speed") or {}):
            if key[:2] in ("pp", "tg") and key[2:].isdigit() and key not in keys:
                keys.append(key)
    return sorted(keys, key=lambda k: (k[:2] != "pp", int(k[2:])))


def markdown_table(data: dict) -> str:
    """One row per file: type, size, bpw, PPL, KLD, top-1 agreement, speeds (only columns with data).

    Example::

        print(markdown_table(read_results("results.json")))
    """
    files = data["files"]
    has_ppl = any(f.get("ppl") is not None for f in files)
    has_kld = any(f.get("kld") for f in files)
    speeds = _speed_keys(files)
    header = ["file", "type", "size", "bpw"]
    if has_ppl:
        header.append("PPL")
    if has_kld:
        header += ["KLD", "same top-1"]
    header += [f"{k} t/s" for k in speeds]
    rows = [header, ["---"] * len(header)]
    for f in files:
        row = [f["file"], f["type"], format_size(f["bytes"]), f"{f['bpw']:.2f}" if f.get("bpw") else "-"]
        if has_ppl:
            row.append(f"{f['ppl']:.4f} ± {f['ppl_err']:.4f}" if f.get("ppl") is not None else "-")
        if has_kld:
            kld = f.get("kld")
            # a file against itself measures ~1e-7 of rounding noise, either sign: print 0
            mean = kld["mean"] if kld and abs(kld["mean"]) >= 5e-7 else 0.0
            row += [f"{mean:.6f} ± {kld['err']:.6f}", f"{100 * kld['same_top1']:.2f} %"] if kld else ["-", "-"]
        for key in speeds:
            s = (f.get("speed") or {}).get(key)
            row.append(f"{s['mean']:.2f} ± {s['std']:.2f}" if s else "-")
        rows.append(row)
    return "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in rows)
