import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "scripts"))   # llama_cpp_tools for the cross-checks

from checkpoints import SHARED_SKIP, shared_fixture  # noqa: E402
from shortquant.resources import demo_model  # noqa: E402

DEMO = demo_model()
DEMO_TOKENIZER = DEMO / "tokenizer.model"


@pytest.fixture(scope="session")
def small_tokenizer():
    """(tokenizer.model path, vocab size) of a small real sentencepiece tokenizer: the demo model's."""
    return DEMO_TOKENIZER, 512


@pytest.fixture(scope="session")
def llama_tokenizer():
    """Meta's 32000-piece LLaMA tokenizer (not ours to ship: ../shared only)."""
    return shared_fixture("llama-tokenizer.model")


@pytest.fixture(scope="session")
def demo_gguf(tmp_path_factory) -> Path:
    """The embedded demo model (trained, depth-pruned, 6 blocks) exported to F32 once per session:
    the real model for tests that run llama.cpp on one."""
    from shortquant.export import ExportOptions, export

    out = tmp_path_factory.mktemp("demo-gguf")
    report = export(DEMO, ExportOptions(quants=("f32",), out_dir=out, quiet=True))
    return report.files[0].path


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def pytest_terminal_summary(terminalreporter):
    """One line for the tests a clone without ../shared skips, and which files they need."""
    reasons = [_skip_reason(r) for r in terminalreporter.stats.get("skipped", [])]
    needed = sorted({r.split(SHARED_SKIP, 1)[1].strip() for r in reasons if SHARED_SKIP in r})
    count = sum(SHARED_SKIP in r for r in reasons)
    if count:
        terminalreporter.write_line(f"{count} test{'s' * (count != 1)} skipped: ../shared/fixtures absent "
                                    f"(files we do not ship: {', '.join(needed)})")
