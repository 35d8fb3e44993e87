import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import FIXTURES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = REPO / "models" / "demo" / "tokenizer.model"
LLAMA_TOKENIZER = FIXTURES / "llama-tokenizer.model"


@pytest.fixture(scope="session")
def small_tokenizer():
    """(tokenizer.model path, vocab size) of a small real sentencepiece tokenizer.

    The demo model's 512-token tokenizer ships with the repo; the 32000-token LLaMA one from
    ../shared is the fallback.
    """
    if DEMO_TOKENIZER.is_file():
        return DEMO_TOKENIZER, 512
    if LLAMA_TOKENIZER.is_file():
        return LLAMA_TOKENIZER, 32000
    pytest.skip("no sentencepiece tokenizer available")


@pytest.fixture(scope="session")
def llama_tokenizer():
    if not LLAMA_TOKENIZER.is_file():
        pytest.skip(f"{LLAMA_TOKENIZER} not present")
    return LLAMA_TOKENIZER
