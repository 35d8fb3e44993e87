"""Sentencepiece tokenizer -> the ``tokenizer.ggml.*`` vocabulary llama.cpp reads.

LLaMA / Vicuna / Mistral checkpoints carry a sentencepiece ``tokenizer.model`` plus Hugging Face
side files. ``read_sentencepiece`` turns them into a ``TokenizerSpec`` written as
``tokenizer.ggml.model = "llama"``.

Rules (the ones llama.cpp's own converter follows, written out here):
- every sentencepiece piece keeps its id, text and score; its type comes from the model
  (unknown, control, unused, byte, else normal);
- added tokens (``tokenizer.json`` ``added_tokens``, then ``added_tokens.json``, then
  ``tokenizer_config.json`` ``added_tokens_decoder``, later files winning) take their ids,
  score -1000, and are CONTROL when special (or shaped like ``<|...|>``), else USER_DEFINED
  with ``▁`` written as a plain space; an added token equal to the piece already at its id
  changes nothing;
- ids nobody defines (gaps, and the rows an embedding has beyond the tokenizer) become
  ``[PAD{id}]`` UNUSED tokens. UNUSED, not USER_DEFINED: llama.cpp matches user-defined
  tokens literally in any input text, so a user typing "[PAD32000]" would get that token,
  where sentencepiece gives ordinary pieces;
- special ids: the token text named in ``tokenizer_config.json`` / ``special_tokens_map.json``,
  else the sentencepiece model's own id, else ``generation_config.json`` / ``config.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shortquant.chat_templates import chat_template as builtin_chat_template
from shortquant.errors import TokenizerError

from .hf_files import (SPECIAL_KINDS, added_token_entries, check_dense, flag, looks_special, read_json_object,
                       special_id)
from .hf_files import chat_template as hf_chat_template
from .spec import SENTENCEPIECE, TokenizerSpec, TokenType

log = logging.getLogger(__name__)

SPIECE_UNDERLINE = "\u2581"
ADDED_TOKEN_SCORE = -1000.0
PAD_TOKEN_SCORE = -1000.0

# llama.cpp's defaults for sentencepiece vocabularies when the config says nothing.
DEFAULT_ADD_BOS = True
DEFAULT_ADD_EOS = False


def read_sentencepiece(folder: Path, chat_template: str | None = None,
                       vocab_size: int | None = None) -> TokenizerSpec:
    """Read a checkpoint folder's sentencepiece tokenizer into a ``TokenizerSpec``.

    ``chat_template`` names a built-in template (``vicuna``, ``llama-2``, ``none``) used
    when the folder has none; ``vocab_size`` is the number of embedding rows, to pad to.

        >>> spec = read_sentencepiece(Path("vicuna-7b-v1.3"), chat_template="vicuna",
        ...                           vocab_size=32000)      # doctest: +SKIP
        >>> spec.bos_id, spec.eos_id, spec.vocab_size         # doctest: +SKIP
        (1, 2, 32000)
    """
    folder = Path(folder)
    builtin = builtin_chat_template(chat_template) if chat_template is not None else None
    model_path = folder / "tokenizer.model"
    if not model_path.is_file():
        raise TokenizerError("no tokenizer.model", folder)
    sp = _load_sentencepiece(model_path)
    warnings: list[str] = []

    tokenizer_config = read_json_object(folder / "tokenizer_config.json")
    special_tokens_map = read_json_object(folder / "special_tokens_map.json")
    generation_config = read_json_object(folder / "generation_config.json")
    model_config = read_json_object(folder / "config.json")

    n_pieces = sp.vocab_size()
    if vocab_size is not None and vocab_size < n_pieces:
        raise TokenizerError(f"tokenizer.model has {n_pieces} pieces but the model's embedding "
                             f"has only {vocab_size} rows", model_path)

    tokens: dict[int, bytes] = {}
    scores: dict[int, float] = {}
    types: dict[int, TokenType] = {}
    text_to_id: dict[str, int] = {}
    for i in range(n_pieces):
        try:
            piece = sp.id_to_piece(i)
        except UnicodeDecodeError:
            raise TokenizerError(f"piece {i} is not valid UTF-8", model_path) from None
        tokens[i] = piece.encode("utf-8")
        scores[i] = float(sp.get_score(i))
        types[i] = _piece_type(sp, i)
        text_to_id.setdefault(piece, i)

    added: dict[int, tuple[str, TokenType]] = {}
    for token_id, content, special in added_token_entries(folder, tokenizer_config):
        if vocab_size is not None and token_id >= vocab_size:
            warnings.append(f"added token {content!r} (id {token_id}) is beyond the "
                            f"embedding's {vocab_size} rows; left out")
            continue
        if token_id < n_pieces and tokens[token_id] == content.encode("utf-8"):
            continue  # <s>, </s>, <unk> restated by Hugging Face: the piece already says it all
        if token_id < n_pieces:
            warnings.append(f"added token {content!r} replaces piece "
                            f"{tokens[token_id].decode('utf-8', 'replace')!r} at id {token_id}")
        kind = TokenType.CONTROL if special or looks_special(content) else TokenType.USER_DEFINED
        text = content if kind == TokenType.CONTROL else content.replace(SPIECE_UNDERLINE, " ")
        tokens[token_id] = text.encode("utf-8")
        scores[token_id] = ADDED_TOKEN_SCORE
        types[token_id] = kind
        text_to_id[content] = token_id
        added[token_id] = (text, kind)

    size = max([n_pieces, vocab_size or 0, *(i + 1 for i in added)])
    check_dense(size, n_pieces + len(added), model_path)
    n_padding = 0
    for i in range(size):
        if i not in tokens:
            tokens[i] = f"[PAD{i}]".encode("utf-8")
            scores[i] = PAD_TOKEN_SCORE
            types[i] = TokenType.UNUSED
            n_padding += 1

    sp_ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    special_ids = {
        kind: special_id(kind, size, text_to_id, (tokenizer_config, special_tokens_map),
                          sp_ids[kind], (generation_config, model_config))
        for kind in SPECIAL_KINDS
    }

    template, template_source = hf_chat_template(folder, tokenizer_config, chat_template, builtin)
    add_bos = flag(tokenizer_config, "add_bos_token", DEFAULT_ADD_BOS)
    add_eos = flag(tokenizer_config, "add_eos_token", DEFAULT_ADD_EOS)
    for key, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
        if not isinstance(value, bool):
            raise TokenizerError(f"{key} must be true or false, not {value!r}",
                                 folder / "tokenizer_config.json")

    for message in warnings:
        log.warning("%s: %s", model_path, message)
    return TokenizerSpec(
        source=model_path,
        tokens=tuple(tokens[i] for i in range(size)),
        scores=tuple(scores[i] for i in range(size)),
        token_types=tuple(types[i] for i in range(size)),
        n_pieces=n_pieces,
        added=tuple((i, text, kind) for i, (text, kind) in sorted(added.items())),
        n_padding=n_padding,
        bos_id=special_ids["bos"],
        eos_id=special_ids["eos"],
        unk_id=special_ids["unk"],
        pad_id=special_ids["pad"],
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=_adds_dummy_prefix(sp),
        chat_template=template,
        chat_template_source=template_source,
        model=SENTENCEPIECE,
        warnings=tuple(warnings),
    )


def _load_sentencepiece(path: Path):
    from sentencepiece import SentencePieceProcessor

    data = path.read_bytes()
    if not data:
        raise TokenizerError("empty file, not a sentencepiece model", path)
    try:
        return SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "parse ModelProto" in reason:
            reason = "cannot parse it as a ModelProto"
        raise TokenizerError(f"not a sentencepiece model ({reason})", path) from None


def _piece_type(sp, i: int) -> TokenType:
    if sp.is_unknown(i):
        return TokenType.UNKNOWN
    if sp.is_control(i):
        return TokenType.CONTROL
    if sp.is_unused(i):
        return TokenType.UNUSED
    if sp.is_byte(i):
        return TokenType.BYTE
    return TokenType.NORMAL


def _adds_dummy_prefix(sp) -> bool:
    # The model proto's normalizer_spec.add_dummy_prefix, observed instead of parsed (that
    # would need protobuf): with it, "a" is encoded as "▁a".
    return "".join(sp.encode("a", out_type=str)).startswith(SPIECE_UNDERLINE)

