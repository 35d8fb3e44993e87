"""Does the installed llama-cpp-python run quantized models on this machine? Exit 0 if so.

A llama.cpp built with ``-march=native`` (llama-cpp-python's default) uses AMX tiles for
quantized matrices on CPUs that have them; some virtual machines fault on AMX ("Illegal
instruction"), which kills any process that evaluates a Q8_0 / K-quant model. ``.ci/run`` runs this
check and, when it fails, rebuilds llama-cpp-python portably (see there). The check writes the demo
model as Q8_0 and evaluates it in a child process, so a crash is reported, not suffered.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=32, verbose=False, n_threads=1)
llm.eval([1, 5, 9, 13])
print("ok")
"""


def write_q8_model(out_dir: Path) -> Path:
    """The embedded demo model as Q8_0 (it crashed an AMX build in our measurements)."""
    from shortquant.export import ExportOptions, export, resolve_source

    source, recipe = resolve_source(None)
    report = export(source, ExportOptions(quants=("q8_0",), out_dir=out_dir, quiet=True))
    return report.files[0].path


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_q8_model(Path(tmp))
        child = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True)
    if child.returncode == 0 and child.stdout.strip() == "ok":
        print("llama-cpp-python runs quantized models here")
        return 0
    print(f"llama-cpp-python cannot run a Q8_0 model here (exit {child.returncode}: "
          f"{(child.stderr.strip().splitlines() or ['no message'])[0]})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
