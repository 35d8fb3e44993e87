"""Text -> token ids with a checkpoint's own tokenizer, exactly as llama.cpp tokenizes a prompt with
the GGUF export of that checkpoint: the only place calibration text becomes ids (``imatrix
FOLDER``, ``export --optimize``'s probes).

The text itself goes through ``sentencepiece`` or Hugging Face ``tokenizers`` (special-token
texts stay text, as llama.cpp's ``parse_special=false``); BOS and EOS follow the rule the export
writes into ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` (the same reading of the folder:
``read_sentencepiece`` / ``read_bpe``), with the ids it writes.
"""

from __future__ import annotations

from pathlib import Path

from shortquant.errors import TokenizerError


def encode_text(folder: Path, text: str) -> tuple[list[int], int | None]:
    """``(ids, bos_id)``: ``text`` tokenized, BOS first when the exported GGUF adds one (then
    ``bos_id`` is its id, else None), EOS last when it adds one.

        >>> ids, bos = encode_text(Path("models/demo"), "Once upon a time")   # doctest: +SKIP
        >>> ids[0] == bos                                                   # doctest: +SKIP
        True
    """
    from . import tokenizer_kind
    from .bpe import _load_hf_tokenizer, read_bpe
    from .sentencepiece import _load_sentencepiece, read_sentencepiece

    folder = Path(folder)
    kind = tokenizer_kind(folder)
    if kind == "sentencepiece":
        spec = read_sentencepiece(folder)
        ids = _load_sentencepiece(folder / "tokenizer.model").encode(text)
    elif kind == "bpe":
        spec = read_bpe(folder, need_pre=False)   # the GGUF's pre-tokenizer name plays no part here
        tokenizer = _load_hf_tokenizer(folder / "tokenizer.json")
        tokenizer.encode_special_tokens = True     # "<|endoftext|>" in the text is text, as in llama.cpp
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    else:
        raise TokenizerError("no tokenizer.model (sentencepiece) or tokenizer.json (BPE) in the model folder",
                             folder)
    bos = spec.bos_id if spec.add_bos else None
    eos = [spec.eos_id] if spec.add_eos and spec.eos_id is not None else []
    return ([bos] if bos is not None else []) + list(ids) + eos, bos
