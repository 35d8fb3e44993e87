"""Byte-level BPE ``tokenizer.json`` -> the ``tokenizer.ggml.*`` vocabulary llama.cpp reads.

Llama-3, Qwen2/2.5/3, SmolLM and most models made since 2024 carry a Hugging Face
``tokenizer.json`` whose model is byte-level BPE. llama.cpp reads it as
``tokenizer.ggml.model = "gpt2"`` with the token texts as the tokenizer stores them (byte-level
alphabet, ``Ġ`` for a space), the merges, and a named pre-tokenizer. Rules, as llama.cpp's
converter applies them:
- ids ``0 .. rows-1`` (``rows`` = the embedding's rows): the vocabulary's token, else the added
  token with that id, else ``[PAD{id}]`` typed UNUSED;
- vocabulary tokens are NORMAL; added tokens are CONTROL when special (or shaped like ``<|...|>``),
  else USER_DEFINED with ``▁`` written as a space; an added token saved with
  ``normalized: false`` is stored as the tokenizer decodes it back;
- merges are ``"left right"``; the pair form (transformers >= 4.45) is joined with a space, a space
  inside a part written as ``Ġ`` (U+0120) so the two forms stay apart;
- BOS/EOS are added when the post-processor adds them (it wins over ``add_bos_token``);
- special ids by text from ``tokenizer_config.json``, else by number from
  ``generation_config.json`` / ``config.json``.
"""

from __future__ import annotations

from pathlib import Path

from shortquant.chat_templates import chat_template as builtin_chat_template
from shortquant.errors import TokenizerError

from .hf_files import (SideFiles, added_token_entries, chat_template, check_dense, flag, looks_special,
                       read_json_object)
from .pre_tokenizer import check_pre_name, detect_pre
from .spec import BPE, TokenizerSpec, TokenType

SPIECE_UNDERLINE = "\u2581"
SPACE_IN_MERGE = chr(ord(" ") + 256)   # how gguf-py writes a space inside a pair-form merge part
# Added tokens llama.cpp treats as "end of turn" (its loader looks for the same texts).
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def read_bpe(folder: Path, chat_template_name: str | None = None, vocab_size: int | None = None,
             pre: str | None = None, need_pre: bool = True) -> TokenizerSpec:
    """Read a folder's byte-level BPE ``tokenizer.json`` into a ``TokenizerSpec``.

    ``vocab_size`` is the number of embedding rows (ids past the tokenizer become padding);
    ``pre`` names llama.cpp's pre-tokenizer when the probe hash is unknown; ``need_pre=False``
    leaves an unknown one as ``"unknown"`` (for encoding text, where no GGUF is written).

        >>> spec = read_bpe(Path("Llama-3.2-1B"), vocab_size=128256)   # doctest: +SKIP
        >>> spec.model, spec.pre, spec.bos_id                          # doctest: +SKIP
        ('gpt2', 'llama-bpe', 128000)
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"
    data = read_json_object(path)
    vocab, merges = _vocab_and_merges(data, path)
    side = SideFiles.read(folder)
    hf_tokenizer = _load_hf_tokenizer(path)
    if pre:
        pre_name = check_pre_name(pre)
    else:
        try:
            pre_name = detect_pre(hf_tokenizer, path)
        except TokenizerError:
            if need_pre:
                raise
            pre_name = "unknown"

    entries = added_token_entries(folder, side.tokenizer_config, data)
    too_far = max(vocab.values(), default=-1)
    rows = vocab_size if vocab_size is not None else max([too_far, *(i for i, _, _ in entries)]) + 1
    if vocab_size is None:
        check_dense(rows, len(vocab) + len(entries), path)
    if too_far >= rows:
        raise TokenizerError(f"the vocabulary has token id {too_far} but the model's embedding has only "
                             f"{rows} rows", path)
    tokens: dict[int, str] = {i: text for text, i in vocab.items()}
    types = dict.fromkeys(tokens, TokenType.NORMAL)
    added: dict[int, tuple[str, TokenType]] = {}
    for token_id, content, special in entries:
        if token_id >= rows:
            raise TokenizerError(f"added token {content!r} has id {token_id}, past the model's {rows} "
                                 f"embedding rows", path)
        kind = TokenType.CONTROL if special or looks_special(content) else TokenType.USER_DEFINED
        text = content
        if kind == TokenType.USER_DEFINED:
            text = _as_decoded(hf_tokenizer, data, content).replace(SPIECE_UNDERLINE, " ")
        tokens[token_id], types[token_id] = text, kind
        added[token_id] = (text, kind)

    n_padding = 0
    for i in range(rows):
        if i not in tokens:
            tokens[i], types[i] = f"[PAD{i}]", TokenType.UNUSED
            n_padding += 1

    text_to_id = {text: i for i, text in tokens.items() if types[i] != TokenType.UNUSED}
    special_ids = {kind: side.special_id(kind, rows, text_to_id) for kind in ("bos", "eos", "unk", "pad")}
    add_bos, add_eos, leading = _added_by_post_processor(data, tokens, special_ids)
    if special_ids["bos"] is None and add_bos and leading in text_to_id:
        special_ids["bos"] = text_to_id[leading]   # the token the post-processor puts first is the BOS
    if add_bos is None:
        add_bos = flag(side.tokenizer_config, "add_bos_token", False)
    if add_eos is None:
        add_eos = flag(side.tokenizer_config, "add_eos_token", False)
    for key, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
        if not isinstance(value, bool):
            raise TokenizerError(f"{key} must be true or false, not {value!r}", folder / "tokenizer_config.json")

    builtin = builtin_chat_template(chat_template_name) if chat_template_name is not None else None
    template, template_source = chat_template(folder, side.tokenizer_config, chat_template_name, builtin)
    eot = next((text_to_id[t] for t in END_OF_TURN if t in text_to_id and text_to_id[t] in added), None)
    return TokenizerSpec(
        source=path,
        tokens=tuple(tokens[i].encode("utf-8") for i in range(rows)),
        scores=None,
        token_types=tuple(types[i] for i in range(rows)),
        n_pieces=len(vocab),
        added=tuple((i, text, kind) for i, (text, kind) in sorted(added.items())),
        n_padding=n_padding,
        bos_id=special_ids["bos"], eos_id=special_ids["eos"],
        unk_id=special_ids["unk"], pad_id=special_ids["pad"],
        add_bos=add_bos, add_eos=add_eos, add_space_prefix=None,
        chat_template=template, chat_template_source=template_source,
        model=BPE, pre=pre_name, merges=tuple(merges), eot_id=eot,
    )


def _vocab_and_merges(data: dict, path: Path) -> tuple[dict[str, int], list[str]]:
    model = data.get("model")
    if not isinstance(model, dict):
        raise TokenizerError("no \"model\" object", path)
    if model.get("type") != "BPE":
        raise TokenizerError(f"tokenizer model {model.get('type')!r} is not supported (byte-level BPE only)", path)
    if not _is_byte_level(data):
        raise TokenizerError("a BPE tokenizer without byte-level pre-tokenization (sentencepiece-style BPE) "
                             "needs its tokenizer.model", path)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError("model.vocab must be a non-empty object of token -> id", path)
    for text, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TokenizerError(f"token {text!r} has a bad id {i!r}", path)
    if len(set(vocab.values())) != len(vocab):
        raise TokenizerError("two vocabulary tokens share one id", path)
    raw = model.get("merges")
    if not isinstance(raw, list):
        raise TokenizerError("model.merges must be a list", path)
    merges = []
    for n, item in enumerate(raw):
        if isinstance(item, str) and item.count(" ") == 1:
            left, right = item.split(" ")
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) for p in item):
            left, right = item
        else:
            raise TokenizerError(f"merge {n} ({item!r}) is neither \"a b\" nor [\"a\", \"b\"]", path)
        for part in (left, right):
            if part not in vocab:
                raise TokenizerError(f"merge {n} ({left!r} + {right!r}) names {part!r}, which is not in the "
                                     f"vocabulary", path)
        merges.append(f"{left.replace(' ', SPACE_IN_MERGE)} {right.replace(' ', SPACE_IN_MERGE)}")
    return vocab, merges


def _is_byte_level(data: dict) -> bool:
    def has_byte_level(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has_byte_level(v) for v in node.values())
        if isinstance(node, list):
            return any(has_byte_level(v) for v in node)
        return False

    return has_byte_level(data.get("pre_tokenizer")) or has_byte_level(data.get("decoder"))


def _load_hf_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:   # plain Exceptions for bad files, and a Rust panic (a BaseException)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TokenizerError(f"the tokenizers library cannot load it ({reason[:200]})", path) from None


def _as_decoded(hf_tokenizer, data: dict, content: str) -> str:
    """An added token saved with ``normalized: false`` is stored as encode -> decode gives it back
    (llama.cpp expects added tokens pre-normalised)."""
    entry = next((t for t in data.get("added_tokens") or [] if t.get("content") == content), None)
    if entry is None or entry.get("normalized", True):
        return content
    return hf_tokenizer.decode(hf_tokenizer.encode(content, add_special_tokens=False).ids,
                               skip_special_tokens=False)


def _added_by_post_processor(data: dict, tokens: dict[int, str],
                             special_ids: dict[str, int | None]) -> tuple[bool | None, bool | None, str | None]:
    """(add_bos, add_eos) as the post-processor decides them (None where it says nothing), and the
    special token it puts first."""
    post = data.get("post_processor")
    if not isinstance(post, dict):
        return None, None, None
    bos_text = tokens.get(special_ids["bos"]) if special_ids["bos"] is not None else None
    eos_text = tokens.get(special_ids["eos"]) if special_ids["eos"] is not None else None
    add_bos = add_eos = first = None
    for proc in post.get("processors") or [post]:
        kind = proc.get("type") if isinstance(proc, dict) else None
        if kind == "ByteLevel":
            add_bos = False if add_bos is None else add_bos
            add_eos = False if add_eos is None else add_eos
        elif kind == "RobertaProcessing":
            add_bos = add_eos = True
        elif kind == "TemplateProcessing":
            single = [item for item in proc.get("single") or [] if isinstance(item, dict)]
            if len(single) > 1:
                first = single[0].get("SpecialToken", {}).get("id")
                last = single[-1].get("SpecialToken", {}).get("id")
                if first is not None:
                    add_bos = first == bos_text or bos_text is None
                if last is not None:
                    add_eos = last == eos_text
    return add_bos, add_eos, first
