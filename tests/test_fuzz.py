"""The fuzz run: every reader, mutated inputs, about a minute; bad input is always one line, exit 2.

The harness (tests/fuzz_readers.py) runs in a subprocess so that a crash (a C library aborting)
or a hang fails this test with the case that caused it instead of taking pytest down. Set
SHORTQUANT_FUZZ_SEED to explore other cases and SHORTQUANT_FUZZ_SECONDS for a longer run;
replay one case with ``python3 tests/fuzz_readers.py --seed S --target T --case N``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


HARNESS = Path(__file__).with_name("fuzz_readers.py")
SEED = int(os.environ.get("SHORTQUANT_FUZZ_SEED", "0"))
SECONDS = float(os.environ.get("SHORTQUANT_FUZZ_SECONDS", "40"))
TOKENIZERS = ("tokenizer-model", "tokenizer-json")
READERS = ("safetensors-header", "safetensors-data", "index-json", "bin-zip", "config-json", "gguf-verify",
           "gguf-imatrix", "gguf-split", "gguf-eval")


def fuzz(tmp_path, seconds: float, *selection: str) -> dict:
    report_path, progress = tmp_path / "fuzz.json", tmp_path / "progress.json"
    proc = subprocess.run([sys.executable, str(HARNESS), "--seconds", str(seconds), "--max-cases", "2000",
                           "--seed", str(SEED), "--json", str(report_path), "--progress", str(progress),
                           *selection], capture_output=True, text=True, timeout=seconds + 240)
    if proc.returncode != 0:
        case = progress.read_text() if progress.exists() else "setup"
        raise AssertionError(f"the fuzz run died (exit {proc.returncode}) in case {case}: {proc.stderr[-2000:]}")
    report = json.loads(report_path.read_text())
    print(f"fuzz seed {report['seed']}: {report['total_cases']} cases in {report['seconds']} s, "
          f"{len(report['defects'])} defects; per target {report['cases']}")
    for target, outcome in report["cases"].items():
        ran = sum(outcome.values())
        assert ran >= 10, f"{target}: only {ran} cases ran"
        assert outcome["error"] > 0, f"{target}: no mutation was ever refused; is the target reading its input?"
    return report


def test_fuzz_checkpoint_and_gguf_readers(tmp_path, small_tokenizer):
    report = fuzz(tmp_path, SECONDS * 0.7, "--exclude", ",".join(TOKENIZERS))
    assert set(READERS) <= set(report["cases"])
    assert not report["defects"], json.dumps(report["defects"][:10], indent=2)


def test_fuzz_tokenizer_readers(tmp_path, small_tokenizer):
    report = fuzz(tmp_path, SECONDS * 0.3, "--target", ",".join(TOKENIZERS))
    assert "tokenizer-model" in report["cases"]
    if report["bpe_reader"]:
        assert "tokenizer-json" in report["cases"]
    assert not report["defects"], json.dumps(report["defects"][:10], indent=2)
