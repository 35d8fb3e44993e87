"""The Hugging Face side files every tokenizer kind shares.

``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json``, the
``added_tokens`` of ``tokenizer.json`` and ``added_tokens.json``, and the chat template (in
``tokenizer_config.json``, ``chat_template.jinja`` or ``chat_template.json``): read once here for
the sentencepiece and the BPE readers alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shortquant.errors import TokenizerError

SPECIAL_KINDS = ("bos", "eos", "unk", "pad")


@dataclass(frozen=True)
class SideFiles:
    """The parsed side files of one checkpoint folder (empty dicts where a file is absent)."""

    folder: Path
    tokenizer_config: dict
    special_tokens_map: dict
    generation_config: dict
    model_config: dict

    @classmethod
    def read(cls, folder: Path) -> "SideFiles":
        return cls(folder, read_json_object(folder / "tokenizer_config.json"),
                   read_json_object(folder / "special_tokens_map.json"),
                   read_json_object(folder / "generation_config.json"),
                   read_json_object(folder / "config.json"))

    def special_id(self, kind: str, size: int, text_to_id: dict[str, int], model_id: int = -1) -> int | None:
        """The id of the ``kind`` token: named by text, else the tokenizer model's own, else numbered."""
        return special_id(kind, size, text_to_id, (self.tokenizer_config, self.special_tokens_map), model_id,
                          (self.generation_config, self.model_config))


def check_dense(size: int, entries: int, path: Path) -> None:
    """Token ids are dense: a vocabulary whose highest id lies far past its entry count is damaged
    (and padding it would take as many tokens as that id)."""
    if size > 2 * entries + 65536:
        raise TokenizerError(f"token id {size - 1} lies far past the {entries} tokens defined "
                             f"(ids must be dense)", path)


def flag(config: dict, key: str, default: bool):
    value = config.get(key)
    return default if value is None else value


def looks_special(text: str) -> bool:
    # Hugging Face sometimes leaves chat markers such as <|im_end|> unflagged; they are
    # control tokens all the same (llama.cpp's converter applies the same test).
    return (text.startswith("<|") and text.endswith("|>")) or \
        (text.startswith("<\uff5c") and text.endswith("\uff5c>"))


def read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"not valid JSON ({exc})", path) from None
    if not isinstance(data, dict):
        raise TokenizerError(f"expected a JSON object, found {type(data).__name__}", path)
    return data


def added_token_entries(folder: Path, tokenizer_config: dict,
                        tokenizer_json_data: dict | None = None) -> list[tuple[int, str, bool | None]]:
    """``(id, content, special)`` from every file that declares added tokens, in priority order.

    ``tokenizer_json_data`` is ``tokenizer.json`` already parsed (it can be large), else it is read.
    """
    entries: list[tuple[int, str, bool | None]] = []

    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json_data is None:
        tokenizer_json_data = read_json_object(tokenizer_json)
    added_tokens = tokenizer_json_data.get("added_tokens") or []
    if not isinstance(added_tokens, list):
        raise TokenizerError("added_tokens must be a list", tokenizer_json)
    for item in added_tokens:
        if not isinstance(item, dict):
            raise TokenizerError("added_tokens entries must be objects", tokenizer_json)
        entries.append(added_entry(item.get("id"), item.get("content"), item.get("special"),
                                    tokenizer_json))

    added_json = folder / "added_tokens.json"
    for content, token_id in read_json_object(added_json).items():
        entries.append(added_entry(token_id, content, None, added_json))

    config_path = folder / "tokenizer_config.json"
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError("added_tokens_decoder must be an object", config_path)
    for key, item in decoder.items():
        if not isinstance(item, dict):
            raise TokenizerError(f"added_tokens_decoder[{key!r}] must be an object", config_path)
        token_id = int(key) if isinstance(key, str) and key.isdigit() else key
        entries.append(added_entry(token_id, item.get("content"), item.get("special"),
                                    config_path))
    return entries


def added_entry(token_id: Any, content: Any, special: Any, path: Path):
    if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
        raise TokenizerError(f"added token {content!r} has a bad id {token_id!r}", path)
    if not isinstance(content, str) or not content:
        raise TokenizerError(f"added token {token_id} has no text", path)
    return token_id, content, bool(special) if special is not None else None


def special_id(kind: str, size: int, text_to_id: dict[str, int], named_in: tuple[dict, ...],
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


def chat_template(folder: Path, tokenizer_config: dict, name: str | None,
                  builtin: str | None) -> tuple[str | tuple[tuple[str, str], ...] | None, str | None]:
    config_path = folder / "tokenizer_config.json"
    if "chat_template" in tokenizer_config and tokenizer_config["chat_template"] is not None:
        return template_value(tokenizer_config["chat_template"], config_path), config_path.name
    # transformers >= 4.43 saves the template beside tokenizer_config.json instead.
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8"), jinja_path.name
    json_path = folder / "chat_template.json"
    if json_path.is_file():
        value = read_json_object(json_path).get("chat_template")
        if value is not None:
            return template_value(value, json_path), json_path.name
    if builtin is not None:
        return builtin, f"built-in {name}"
    return None, None


def template_value(value: Any, path: Path) -> str | tuple[tuple[str, str], ...]:
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
