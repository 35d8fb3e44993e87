"""``TokenizerSpec``: everything a GGUF's tokenizer section holds, as one plain value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

TokenType = gguf.TokenType

# tokenizer.ggml.model values llama.cpp reads.
SENTENCEPIECE = "llama"
BPE = "gpt2"


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer as llama.cpp will read it.

    ``tokens[i]``, ``scores[i]`` and ``token_types[i]`` describe token id ``i``. ``model`` is
    ``llama`` (sentencepiece) or ``gpt2`` (byte-level BPE); ``pre`` names llama.cpp's
    pre-tokenizer and ``merges`` holds the BPE merges (``"a b"``; empty for sentencepiece).
    ``added`` lists the added tokens as ``(id, text, type)``; ``n_pieces`` is the size of the
    base vocabulary, ``n_padding`` how many ``[PAD{id}]`` fillers were appended.
    ``chat_template`` is a string, a tuple of ``(name, template)`` pairs, or None;
    ``chat_template_source`` says where it came from.
    """

    source: Path
    tokens: tuple[bytes, ...]
    scores: tuple[float, ...] | None
    token_types: tuple[TokenType, ...]
    n_pieces: int
    added: tuple[tuple[int, str, TokenType], ...]
    n_padding: int
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | tuple[tuple[str, str], ...] | None
    chat_template_source: str | None
    model: str = SENTENCEPIECE
    pre: str = "default"
    merges: tuple[str, ...] = ()
    eot_id: int | None = None
    warnings: tuple[str, ...] = field(default=())

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def kind(self) -> str:
        """``sentencepiece`` or ``bpe``, for people."""
        return "bpe" if self.model == BPE else "sentencepiece"

    def summary(self) -> dict[str, Any]:
        """A small JSON-able description, for ``inspect`` (everything but the token lists).

            >>> spec.summary()["bos_id"]                        # doctest: +SKIP
            1
        """
        return {
            "source": str(self.source),
            "kind": self.kind,
            "model": self.model,
            "pre": self.pre,
            "vocab_size": self.vocab_size,
            "pieces": self.n_pieces,
            "merges": len(self.merges),
            "added": [{"id": i, "text": text, "type": kind.name} for i, text, kind in self.added],
            "padding": self.n_padding,
            "bos_id": self.bos_id, "eos_id": self.eos_id, "eot_id": self.eot_id,
            "unk_id": self.unk_id, "pad_id": self.pad_id,
            "add_bos": self.add_bos, "add_eos": self.add_eos,
            "add_space_prefix": self.add_space_prefix,
            "chat_template": self.chat_template_source,
            "warnings": list(self.warnings),
        }
