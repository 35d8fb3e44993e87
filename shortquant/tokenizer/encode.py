"""Text -> token ids with a checkpoint's own tokenizer, as llama.cpp tokenizes a prompt.

For computing statistics on the Hugging Face model (importance matrices) before any GGUF exists:
sentencepiece through ``sentencepiece``, BPE through Hugging Face ``tokenizers``; a BOS first when
the tokenizer adds one.
"""

from __future__ import annotations

from pathlib import Path

from shortquant.errors import TokenizerError


def encode_text(folder: Path, text: str) -> tuple[list[int], int | None]:
    """``(ids, bos_id)``: ``text`` tokenized, BOS first when the tokenizer adds one.

        >>> ids, bos = encode_text(Path("models/demo"), "Once upon a time")   # doctest: +SKIP
        >>> ids[0] == bos                                                   # doctest: +SKIP
        True
    """
    from . import tokenizer_kind
    from .bpe import read_bpe

    folder = Path(folder)
    kind = tokenizer_kind(folder)
    if kind == "sentencepiece":
        return _encode_sentencepiece(folder / "tokenizer.model", text)
    if kind == "bpe":
        spec = read_bpe(folder, need_pre=False)   # the GGUF's pre-tokenizer name plays no part here
        ids = _load_tokenizers(folder / "tokenizer.json").encode(text, add_special_tokens=False).ids
        bos = spec.bos_id if spec.add_bos else None
        return ([bos] if bos is not None else []) + ids, bos
    raise TokenizerError("no tokenizer.model (sentencepiece) or tokenizer.json (BPE) in the model folder",
                         folder)


def _encode_sentencepiece(path: Path, text: str) -> tuple[list[int], int | None]:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"cannot load sentencepiece model: {exc}", path) from exc
    bos = sp.bos_id()
    bos_id = bos if bos >= 0 else None
    return ([bos_id] if bos_id is not None else []) + sp.encode(text), bos_id


def _load_tokenizers(path: Path):
    from .bpe import _load_hf_tokenizer

    return _load_hf_tokenizer(path)
