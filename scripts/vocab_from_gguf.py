"""Rebuild a sentencepiece ``tokenizer.model`` from the vocabulary a LLaMA GGUF embeds.

A llama.cpp GGUF of a sentencepiece model keeps every piece with its score and type under
``tokenizer.ggml.*``. That is all a BPE sentencepiece model needs to encode: the pieces, their
scores (merge priority), their types (normal, control, byte, ...) and the normalizer LLaMA uses
(no NFKC, a dummy prefix space, spaces escaped as U+2581, extra spaces kept). This module writes
that back as a ``ModelProto`` so transformers and sentencepiece can use the vocabulary of
``stories260K.gguf``.

Needs ``protobuf`` (sentencepiece's ``sentencepiece_model_pb2`` is generated protobuf code).

    python scripts/vocab_from_gguf.py ../shared/fixtures/stories260K.gguf tokenizer.model

    >>> proto = sentencepiece_model_from_gguf("../shared/fixtures/stories260K.gguf")
    >>> import sentencepiece as spm
    >>> spm.SentencePieceProcessor(model_proto=proto).encode("Once upon a time")
    [403, 407, 261, 378]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf

# sentencepiece's piece types use the same numbers as gguf.TokenType; map them by name anyway
# so a change on either side fails loudly instead of silently mislabelling pieces.
_PIECE_TYPE_NAMES = {
    gguf.TokenType.NORMAL: "NORMAL",
    gguf.TokenType.UNKNOWN: "UNKNOWN",
    gguf.TokenType.CONTROL: "CONTROL",
    gguf.TokenType.USER_DEFINED: "USER_DEFINED",
    gguf.TokenType.UNUSED: "UNUSED",
    gguf.TokenType.BYTE: "BYTE",
}


class VocabError(ValueError):
    """The GGUF has no sentencepiece-style vocabulary we can rebuild."""


def _field(reader: gguf.GGUFReader, key: str, path: Path):
    field = reader.get_field(key)
    if field is None:
        raise VocabError(f"{path}: no {key}")
    return field.contents()


def _optional_id(reader: gguf.GGUFReader, key: str) -> int:
    field = reader.get_field(key)
    if field is None:
        return -1
    value = int(field.contents())
    return -1 if value >= 2**31 else value  # llama.cpp writes "none" as uint32 -1


def read_gguf_vocab(path: str | Path) -> dict:
    """The ``tokenizer.ggml.*`` vocabulary of a GGUF as plain Python values.

    >>> vocab = read_gguf_vocab("../shared/fixtures/stories260K.gguf")
    >>> vocab["tokens"][:3], vocab["bos_id"]
    (['<unk>', '<s>', '</s>'], 1)
    """
    path = Path(path)
    reader = gguf.GGUFReader(str(path))
    model = _field(reader, gguf.Keys.Tokenizer.MODEL, path)
    if model != "llama":
        raise VocabError(f"{path}: tokenizer model is {model!r}, not sentencepiece ('llama')")
    tokens = list(_field(reader, gguf.Keys.Tokenizer.LIST, path))
    scores = [float(s) for s in _field(reader, gguf.Keys.Tokenizer.SCORES, path)]
    types = [gguf.TokenType(int(t)) for t in _field(reader, gguf.Keys.Tokenizer.TOKEN_TYPE, path)]
    if not len(tokens) == len(scores) == len(types):
        raise VocabError(f"{path}: tokens, scores and token types differ in length")
    return {
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "unk_id": _optional_id(reader, gguf.Keys.Tokenizer.UNK_ID),
        "bos_id": _optional_id(reader, gguf.Keys.Tokenizer.BOS_ID),
        "eos_id": _optional_id(reader, gguf.Keys.Tokenizer.EOS_ID),
        "pad_id": _optional_id(reader, gguf.Keys.Tokenizer.PAD_ID),
    }


def sentencepiece_model_from_gguf(path: str | Path) -> bytes:
    """A serialized sentencepiece ``ModelProto`` (BPE, byte fallback) equal in vocabulary to the GGUF's.

    >>> len(sentencepiece_model_from_gguf("../shared/fixtures/stories260K.gguf")) > 0
    True
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = read_gguf_vocab(path)
    proto = pb.ModelProto()
    for text, score, kind in zip(vocab["tokens"], vocab["scores"], vocab["types"]):
        piece = proto.pieces.add()
        piece.piece = text
        piece.score = score
        piece.type = pb.ModelProto.SentencePiece.Type.Value(_PIECE_TYPE_NAMES[kind])

    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.ModelType.BPE
    spec.vocab_size = len(vocab["tokens"])
    spec.byte_fallback = any(kind == gguf.TokenType.BYTE for kind in vocab["types"])
    spec.unk_id, spec.bos_id = vocab["unk_id"], vocab["bos_id"]
    spec.eos_id, spec.pad_id = vocab["eos_id"], vocab["pad_id"]
    for name, token_id in (("unk_piece", spec.unk_id), ("bos_piece", spec.bos_id),
                           ("eos_piece", spec.eos_id), ("pad_piece", spec.pad_id)):
        if token_id >= 0:
            setattr(spec, name, vocab["tokens"][token_id])
    # Training-only options, set as llama2.c trained its small vocabularies.
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.character_coverage = 1.0
    spec.unk_surface = " \u2047 "

    # LLaMA's normalizer: identity (no NFKC), dummy prefix, escaped spaces, spaces kept as they are.
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.precompiled_charsmap = b""
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="a GGUF with a sentencepiece ('llama') vocabulary")
    parser.add_argument("out", type=Path, help="where to write tokenizer.model")
    args = parser.parse_args(argv)
    try:
        proto = sentencepiece_model_from_gguf(args.gguf)
    except (VocabError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.write_bytes(proto)
    print(f"wrote {args.out} ({len(proto)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
