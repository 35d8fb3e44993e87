"""Tokenizers: a checkpoint's tokenizer files -> the ``tokenizer.ggml.*`` section llama.cpp reads.

Two readers behind one call: sentencepiece (``tokenizer.model``, written as ``llama``) and
byte-level BPE (``tokenizer.json``, written as ``gpt2`` with a named pre-tokenizer). The Hugging
Face side files both need (added tokens, special ids, chat template) are read once in
``hf_files``. A folder with both files is read as llama.cpp reads the families we convert: the
sentencepiece model first.
"""

from __future__ import annotations

from pathlib import Path

from shortquant.chat_templates import chat_template as builtin_chat_template
from shortquant.errors import TokenizerError

from .bpe import read_bpe
from .sentencepiece import read_sentencepiece
from .spec import BPE, SENTENCEPIECE, TokenizerSpec, TokenType
from .write import write_tokenizer

__all__ = ["TokenizerSpec", "TokenType", "read_tokenizer", "write_tokenizer", "tokenizer_kind",
           "BPE", "SENTENCEPIECE"]


def tokenizer_kind(folder: Path) -> str | None:
    """``sentencepiece``, ``bpe`` or None: which reader ``read_tokenizer`` will use."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        return "sentencepiece"
    if (folder / "tokenizer.json").is_file():
        return "bpe"
    return None


def read_tokenizer(folder: Path, chat_template: str | None = None, vocab_size: int | None = None,
                   pre: str | None = None) -> TokenizerSpec:
    """Read a checkpoint folder's tokenizer into a ``TokenizerSpec``.

    ``chat_template`` names a built-in template used when the folder has none; ``vocab_size`` is
    the number of embedding rows, to pad to; ``pre`` forces llama.cpp's BPE pre-tokenizer name.

        >>> spec = read_tokenizer(Path("models/demo"), vocab_size=512)   # doctest: +SKIP
        >>> spec.kind, spec.vocab_size                                   # doctest: +SKIP
        ('sentencepiece', 512)
    """
    folder = Path(folder)
    if chat_template is not None:
        builtin_chat_template(chat_template)   # an unknown name fails first, whatever the files
    kind = tokenizer_kind(folder)
    if kind == "sentencepiece":
        return read_sentencepiece(folder, chat_template, vocab_size)
    if kind == "bpe":
        return read_bpe(folder, chat_template, vocab_size, pre)
    raise TokenizerError("no tokenizer.model (sentencepiece) or tokenizer.json (BPE)", folder)
