"""Which llama.cpp pre-tokenizer a BPE tokenizer uses (``tokenizer.ggml.pre``).

llama.cpp cannot read a ``tokenizer.json``'s pre-tokenizer rules; it implements each known one in
C++ under a name. Its converter finds the name by encoding a fixed probe text with the Hugging Face
tokenizer and looking the sha256 of ``str(token_ids)`` up in a table. We do the same with the same
probe text and table (``pre_hashes.json``, extracted from llama.cpp's source by
``scripts/extract_pre_hashes.py``; its ``source`` field says from where).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from shortquant.errors import TokenizerError


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(resources.files(__package__).joinpath("pre_hashes.json").read_text(encoding="utf-8"))


def probe_text() -> str:
    return _table()["probe_text"]


def known_pre_names() -> list[str]:
    """Every pre-tokenizer name llama.cpp's table knows, sorted."""
    return sorted({entry["pre"] for entry in _table()["hashes"].values()})


def probe_hash(token_ids: list[int]) -> str:
    """The digest llama.cpp computes from the probe text's token ids."""
    return hashlib.sha256(str(list(token_ids)).encode()).hexdigest()


def pre_for_hash(digest: str) -> str | None:
    entry = _table()["hashes"].get(digest)
    return entry["pre"] if entry else None


def detect_pre(hf_tokenizer, path: Path) -> str:
    """The pre-tokenizer name for a loaded ``tokenizers.Tokenizer``, or a TokenizerError.

    The probe is encoded with special tokens, as ``AutoTokenizer.encode`` does in llama.cpp's
    converter (a BOS added by the post-processor is part of the hash).
    """
    try:
        digest = probe_hash(hf_tokenizer.encode(probe_text()).ids)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:   # a tokenizer.json the library loads but cannot run (a Rust panic)
        raise TokenizerError(f"the tokenizer fails on llama.cpp's probe text ({str(exc)[:160]})", path) from None
    name = pre_for_hash(digest)
    if name is None:
        raise TokenizerError(
            f"unknown BPE pre-tokenizer (probe hash {digest} is not in llama.cpp's table); if you know "
            f"which one the model uses, pass --pre NAME (for example llama-bpe, qwen2, smollm)", path)
    return name


def check_pre_name(name: str) -> str:
    """``name`` if llama.cpp knows it, else a TokenizerError listing close names."""
    import difflib

    names = known_pre_names()
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise TokenizerError(f"unknown pre-tokenizer {name!r} for --pre; {hint}known: {', '.join(names)}")
