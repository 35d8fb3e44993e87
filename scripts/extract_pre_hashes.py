"""Rebuild ``shortquant/tokenizer/pre_hashes.json`` from llama.cpp's converter.

llama.cpp names a BPE pre-tokenizer (``tokenizer.ggml.pre``) by encoding a fixed probe text with
the model's Hugging Face tokenizer and looking the sha256 of the token ids up in a table written
into ``get_vocab_base_pre`` (``conversion/base.py``, formerly ``convert_hf_to_gguf.py``). The
probe text and the table are facts about llama.cpp; this script reads them out of its source so
our copy can be refreshed when llama.cpp adds models:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/src
    tar xzf /tmp/src/llama_cpp_python-0.3.36.tar.gz -C /tmp/src
    python scripts/extract_pre_hashes.py /tmp/src/llama_cpp_python-0.3.36/vendor/llama.cpp
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "shortquant" / "tokenizer" / "pre_hashes.json"


def extract(llama_cpp: Path) -> dict:
    for candidate in ("conversion/base.py", "convert_hf_to_gguf.py"):
        source = llama_cpp / candidate
        if source.is_file() and "def get_vocab_base_pre" in source.read_text(encoding="utf-8"):
            break
    else:
        raise SystemExit(f"{llama_cpp}: no get_vocab_base_pre found")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_vocab_base_pre")
    probe = next(n.value.value for n in func.body
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "chktxt")
    # Each entry: if chkhsh == "<hash>": # ref: <url>  res = "<name>"
    text = ast.get_source_segment(source.read_text(encoding="utf-8"), func)
    entries = re.findall(r'chkhsh == "([0-9a-f]{64})":\s*\n\s*# ref: (\S+)\s*\n\s*res = "([^"]+)"', text)
    hashes: dict[str, dict[str, str]] = {}
    for digest, ref, name in entries:
        hashes.setdefault(digest, {"pre": name, "ref": ref})
    return {
        "source": f"llama.cpp {source.relative_to(llama_cpp)}: get_vocab_base_pre (as vendored by "
                  f"llama-cpp-python); probe text and hashes are llama.cpp's",
        "probe_text": probe,
        "hashes": hashes,
    }


if __name__ == "__main__":
    data = extract(Path(sys.argv[1]))
    OUT.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(data['hashes'])} pre-tokenizer hashes")
