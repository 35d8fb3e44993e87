"""Fetch llama.cpp's tokenizer test vectors for the BPE tokenizer tests.

llama.cpp keeps, per vocabulary, input texts and the token ids its tokenizer must produce
(``models/ggml-vocab-<name>.gguf.inp`` / ``.out``). They ship inside llama-cpp-python's source
package; this script downloads that package (the version installed here) with pip and keeps only
those files, in ``.cache/vocab-vectors/`` (git-ignored), where ``tests/test_tokenizer_bpe.py``
looks for them. ``.ci/run`` calls it; without the files those tests skip.

    python scripts/get_vocab_vectors.py [--sdist PATH]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / ".cache" / "vocab-vectors"
VOCABS = ("llama-bpe", "qwen2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="llama-cpp-python source package already downloaded")
    args = parser.parse_args()
    wanted = {f"ggml-vocab-{v}.gguf.{ext}" for v in VOCABS for ext in ("inp", "out")}
    if all((OUT / name).is_file() for name in wanted):
        print(f"{OUT}: already there")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            version = metadata.version("llama-cpp-python")
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={version}", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        OUT.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in wanted and "/vendor/llama.cpp/models/" in member.name:
                    (OUT / name).write_bytes(tar.extractfile(member).read())
    missing = sorted(n for n in wanted if not (OUT / n).is_file())
    print(f"{OUT}: {len(wanted) - len(missing)} files" + (f", missing {missing}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
