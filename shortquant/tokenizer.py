"""Sentencepiece tokenizer -> the ``tokenizer.ggml.*`` vocabulary llama.cpp reads.

LLaMA / Vicuna checkpoints carry a sentencepiece ``tokenizer.model`` plus Hugging Face side
files. ``read_tokenizer`` turns them into a ``TokenizerSpec`` (a plain value the plan holds
and ``inspect`` can print); ``write_tokenizer`` puts it into a GGUF as
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

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from shortquant.chat_templates import chat_template as builtin_chat_template
from shortquant.errors import TokenizerError

log = logging.getLogger(__name__)

TokenType = gguf.TokenType

SPIECE_UNDERLINE = "\u2581"
ADDED_TOKEN_SCORE = -1000.0
PAD_TOKEN_SCORE = -1000.0
SPECIAL_KINDS = ("bos", "eos", "unk", "pad")

# llama.cpp's defaults for sentencepiece vocabularies when the config says nothing.
DEFAULT_ADD_BOS = True
DEFAULT_ADD_EOS = False


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything the GGUF's tokenizer section holds, ready to write.

    ``tokens[i]``, ``scores[i]`` and ``token_types[i]`` describe token id ``i``.
    ``added`` lists the added tokens as ``(id, text, type)``; ``n_pieces`` is the size of the
    sentencepiece model, ``n_padding`` how many ``[PAD{id}]`` fillers were appended.
    ``chat_template`` is a string, a tuple of ``(name, template)`` pairs, or None;
    ``chat_template_source`` says where it came from.
    """

    source: Path
    tokens: tuple[bytes, ...]
    scores: tuple[float, ...]
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
    add_space_prefix: bool
    chat_template: str | tuple[tuple[str, str], ...] | None
    chat_template_source: str | None
    warnings: tuple[str, ...] = field(default=())

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def summary(self) -> dict[str, Any]:
        """A small JSON-able description, for ``inspect`` (everything but the token lists).

            >>> spec.summary()["bos_id"]                        # doctest: +SKIP
            1
        """
        return {
            "source": str(self.source),
            "vocab_size": self.vocab_size,
            "pieces": self.n_pieces,
            "added": [{"id": i, "text": text, "type": kind.name} for i, text, kind in self.added],
            "padding": self.n_padding,
            "bos_id": self.bos_id, "eos_id": self.eos_id,
            "unk_id": self.unk_id, "pad_id": self.pad_id,
            "add_bos": self.add_bos, "add_eos": self.add_eos,
            "add_space_prefix": self.add_space_prefix,
            "chat_template": self.chat_template_source,
            "warnings": list(self.warnings),
        }


def read_tokenizer(folder: Path, chat_template: str | None = None,
                   vocab_size: int | None = None) -> TokenizerSpec:
    """Read a checkpoint folder's sentencepiece tokenizer into a ``TokenizerSpec``.

    ``chat_template`` names a built-in template (``vicuna``, ``llama-2``, ``none``) used
    when the folder has none; ``vocab_size`` is the number of embedding rows, to pad to.

        >>> spec = read_tokenizer(Path("vicuna-7b-v1.3"), chat_template="vicuna",
        ...                       vocab_size=32000)          # doctest: +SKIP
        >>> spec.bos_id, spec.eos_id, spec.vocab_size         # doctest: +SKIP
        (1, 2, 32000)
    """
    folder = Path(folder)
    builtin = builtin_chat_template(chat_template) if chat_template is not None else None
    model_path = folder / "tokenizer.model"
    if not model_path.is_file():
        raise TokenizerError("no tokenizer.model (only sentencepiece tokenizers are supported)",
                             folder)
    sp = _load_sentencepiece(model_path)
    warnings: list[str] = []

    tokenizer_config = _read_json_object(folder / "tokenizer_config.json")
    special_tokens_map = _read_json_object(folder / "special_tokens_map.json")
    generation_config = _read_json_object(folder / "generation_config.json")
    model_config = _read_json_object(folder / "config.json")

    n_pieces = sp.vocab_size()
    if vocab_size is not None and vocab_size < n_pieces:
        raise TokenizerError(f"tokenizer.model has {n_pieces} pieces but the model's embedding "
                             f"has only {vocab_size} rows", model_path)

    tokens: dict[int, bytes] = {}
    scores: dict[int, float] = {}
    types: dict[int, TokenType] = {}
    text_to_id: dict[str, int] = {}
    for i in range(n_pieces):
        piece = sp.id_to_piece(i)
        tokens[i] = piece.encode("utf-8")
        scores[i] = float(sp.get_score(i))
        types[i] = _piece_type(sp, i)
        text_to_id.setdefault(piece, i)

    added: dict[int, tuple[str, TokenType]] = {}
    for token_id, content, special in _added_token_entries(folder, tokenizer_config):
        if vocab_size is not None and token_id >= vocab_size:
            warnings.append(f"added token {content!r} (id {token_id}) is beyond the "
                            f"embedding's {vocab_size} rows; left out")
            continue
        if token_id < n_pieces and tokens[token_id] == content.encode("utf-8"):
            continue  # <s>, </s>, <unk> restated by Hugging Face: the piece already says it all
        if token_id < n_pieces:
            warnings.append(f"added token {content!r} replaces piece "
                            f"{tokens[token_id].decode('utf-8', 'replace')!r} at id {token_id}")
        kind = TokenType.CONTROL if special or _looks_special(content) else TokenType.USER_DEFINED
        text = content if kind == TokenType.CONTROL else content.replace(SPIECE_UNDERLINE, " ")
        tokens[token_id] = text.encode("utf-8")
        scores[token_id] = ADDED_TOKEN_SCORE
        types[token_id] = kind
        text_to_id[content] = token_id
        added[token_id] = (text, kind)

    size = max([n_pieces, vocab_size or 0, *(i + 1 for i in added)])
    n_padding = 0
    for i in range(size):
        if i not in tokens:
            tokens[i] = f"[PAD{i}]".encode("utf-8")
            scores[i] = PAD_TOKEN_SCORE
            types[i] = TokenType.UNUSED
            n_padding += 1

    sp_ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    special_ids = {
        kind: _special_id(kind, size, text_to_id, (tokenizer_config, special_tokens_map),
                          sp_ids[kind], (generation_config, model_config))
        for kind in SPECIAL_KINDS
    }

    template, template_source = _chat_template(folder, tokenizer_config, chat_template, builtin)
    add_bos = _flag(tokenizer_config, "add_bos_token", DEFAULT_ADD_BOS)
    add_eos = _flag(tokenizer_config, "add_eos_token", DEFAULT_ADD_EOS)
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
        warnings=tuple(warnings),
    )


def write_tokenizer(writer: gguf.GGUFWriter, spec: TokenizerSpec) -> None:
    """Add the ``tokenizer.ggml.*`` keys and ``tokenizer.chat_template`` to ``writer``.

        >>> writer = gguf.GGUFWriter("out.gguf", "llama")           # doctest: +SKIP
        >>> write_tokenizer(writer, read_tokenizer(Path("vicuna")))  # doctest: +SKIP
    """
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(spec.tokens))
    writer.add_token_scores(list(spec.scores))
    writer.add_token_types([int(t) for t in spec.token_types])
    for kind, token_id in (("bos", spec.bos_id), ("eos", spec.eos_id),
                           ("unk", spec.unk_id), ("pad", spec.pad_id)):
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(spec.add_bos)
    writer.add_add_eos_token(spec.add_eos)
    writer.add_add_space_prefix(spec.add_space_prefix)
    if isinstance(spec.chat_template, str):
        writer.add_chat_template(spec.chat_template)
    elif spec.chat_template is not None:
        writer.add_chat_template([{"name": name, "template": text}
                                  for name, text in spec.chat_template])


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


def _flag(config: dict, key: str, default: bool):
    value = config.get(key)
    return default if value is None else value


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


def _looks_special(text: str) -> bool:
    # Hugging Face sometimes leaves chat markers such as <|im_end|> unflagged; they are
    # control tokens all the same.
    return text.startswith("<|") and text.endswith("|>")


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"not valid JSON ({exc})", path) from None
    if not isinstance(data, dict):
        raise TokenizerError(f"expected a JSON object, found {type(data).__name__}", path)
    return data


def _added_token_entries(folder: Path, tokenizer_config: dict) -> list[tuple[int, str, bool | None]]:
    """``(id, content, special)`` from every file that declares added tokens, in priority order."""
    entries: list[tuple[int, str, bool | None]] = []

    tokenizer_json = folder / "tokenizer.json"
    for item in _read_json_object(tokenizer_json).get("added_tokens") or []:
        if not isinstance(item, dict):
            raise TokenizerError("added_tokens entries must be objects", tokenizer_json)
        entries.append(_added_entry(item.get("id"), item.get("content"), item.get("special"),
                                    tokenizer_json))

    added_json = folder / "added_tokens.json"
    for content, token_id in _read_json_object(added_json).items():
        entries.append(_added_entry(token_id, content, None, added_json))

    config_path = folder / "tokenizer_config.json"
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError("added_tokens_decoder must be an object", config_path)
    for key, item in decoder.items():
        if not isinstance(item, dict):
            raise TokenizerError(f"added_tokens_decoder[{key!r}] must be an object", config_path)
        token_id = int(key) if isinstance(key, str) and key.isdigit() else key
        entries.append(_added_entry(token_id, item.get("content"), item.get("special"),
                                    config_path))
    return entries


def _added_entry(token_id: Any, content: Any, special: Any, path: Path):
    if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
        raise TokenizerError(f"added token {content!r} has a bad id {token_id!r}", path)
    if not isinstance(content, str) or not content:
        raise TokenizerError(f"added token {token_id} has no text", path)
    return token_id, content, bool(special) if special is not None else None


def _special_id(kind: str, size: int, text_to_id: dict[str, int], named_in: tuple[dict, ...],
                sp_id: int, numbered_in: tuple[dict, ...]) -> int | None:
    for config in named_in:
        entry = config.get(f"{kind}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(text, str) and text in text_to_id:
            return text_to_id[text]
    if 0 <= sp_id < size:
        return sp_id
    for config in numbered_in:
        value = config.get(f"{kind}_token_id")
        if isinstance(value, list):  # generation_config may list several EOS ids
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size:
            return value
    return None


def _chat_template(folder: Path, tokenizer_config: dict, name: str | None,
                   builtin: str | None) -> tuple[str | tuple[tuple[str, str], ...] | None, str | None]:
    config_path = folder / "tokenizer_config.json"
    if "chat_template" in tokenizer_config and tokenizer_config["chat_template"] is not None:
        return _template_value(tokenizer_config["chat_template"], config_path), config_path.name
    # transformers >= 4.43 saves the template beside tokenizer_config.json instead.
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8"), jinja_path.name
    json_path = folder / "chat_template.json"
    if json_path.is_file():
        value = _read_json_object(json_path).get("chat_template")
        if value is not None:
            return _template_value(value, json_path), json_path.name
    if builtin is not None:
        return builtin, f"built-in {name}"
    return None, None


def _template_value(value: Any, path: Path) -> str | tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        pairs = []
        for item in value:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise TokenizerError("chat_template list entries must be "
                                     "{\"name\": ..., \"template\": ...}", path)
            pairs.append((item["name"], item["template"]))
        return tuple(pairs)
    raise TokenizerError(f"chat_template must be a string or a list of named templates, "
                         f"not {type(value).__name__}", path)
