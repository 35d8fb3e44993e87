"""Tokenizer stage: sentencepiece tokenizer.model -> GGUF tokenizer that llama.cpp reads.

The reference is sentencepiece itself (for tokenization and detokenization) and llama.cpp
through llama-cpp-python (loading a vocab-only GGUF that holds our tokenizer), plus gguf-py's
reader for the metadata and jinja2 / llama-cpp-python's chat formatter for the templates.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import gguf
import pytest

from shortquant.chat_templates import CHAT_TEMPLATES, VICUNA_SYSTEM_PROMPT, chat_template
from shortquant.errors import TokenizerError
from shortquant.tokenizer import TokenizerSpec, read_tokenizer, write_tokenizer
from shortquant.resources import demo_model
from tests.checkpoints import FIXTURES, shared_fixture

LLAMA_TOKENIZER = FIXTURES / "llama-tokenizer.model"   # Meta's, 32000 pieces: ../shared only
DEMO_TOKENIZER = demo_model() / "tokenizer.model"        # ours, 512 pieces: always here
TokenType = gguf.TokenType

# What lmsys/vicuna-7b-v1.3 ships beside its tokenizer.model (abridged to the fields we read).
VICUNA_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False,
                  "normalized": True, "rstrip": False, "single_word": False},
    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False,
                  "normalized": True, "rstrip": False, "single_word": False},
    "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False,
                  "normalized": True, "rstrip": False, "single_word": False},
    "pad_token": None,
    "legacy": False,
    "model_max_length": 2048,
    "tokenizer_class": "LlamaTokenizer",
}
VICUNA_SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>",
                             "unk_token": "<unk>"}

HARD_STRINGS = [
    "Hello world",
    "",
    " leading space",
    "   three leading spaces",
    "multiple   spaces  inside",
    "trailing spaces   ",
    "   ",
    "tabs\tand\t\ttabs\t",
    "new\nline\n\nparagraph\n",
    "\n\nstarts with newlines",
    "\r\nwindows line ends\r\n",
    "digits 0123456789, pi 3.14159, 1,000,000 and 12345678901234567890123",
    "Übergrößenträger café naïve façade résumé",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧",
    "RTL: שלום עולם and مرحبا بالعالم",
    "Ελληνικά Русский ไทย हिन्दी",
    "rare CJK 𠜎𠜱𡃁 鱻龘 and llama 🦙 fall back to bytes",
    "control \x07\x1b bytes",
    "</s> as text, <s> too, and <unk>",
    "def f(x):\n    return x**2  # comment\n",
    "¿Qué? ¡Sí! — “quotes” ‘single’ … «guillemets»",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "[PAD32001] looks like a padding token",
]


# ---------------------------------------------------------------------------------- helpers

def make_folder(root: Path, name: str, files: dict[str, object] | None = None,
                model: Path | None = DEMO_TOKENIZER) -> Path:
    """A checkpoint-like folder with tokenizer.model and the given JSON side files."""
    if model == LLAMA_TOKENIZER:
        shared_fixture(LLAMA_TOKENIZER.name)
    folder = root / name
    folder.mkdir()
    if model is not None:
        (folder / "tokenizer.model").write_bytes(model.read_bytes())
    for file_name, content in (files or {}).items():
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / file_name).write_text(text, encoding="utf-8")
    return folder


def write_vocab_gguf(spec: TokenizerSpec, path: Path) -> Path:
    """A tensor-less llama GGUF holding only hparams and the tokenizer (enough for vocab_only)."""
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    write_tokenizer(writer, spec)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def llama_detokenize(llm, tokens: list[int]) -> bytes:
    """llama.cpp's own detokenizer (drops the dummy-prefix space like sentencepiece does)."""
    import llama_cpp

    array = (llama_cpp.llama_token * len(tokens))(*tokens)
    size = 4 * len(tokens) * 16 + 16
    buffer = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(llm._model.vocab, array, len(tokens), buffer, size, False, False)
    assert n >= 0
    return buffer.raw[:n]


def token_attr(llm, token_id: int) -> int:
    import llama_cpp

    return llama_cpp.llama_vocab_get_attr(llm._model.vocab, token_id)


def read_fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


K = gguf.Keys.Tokenizer


# ---------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def sp():
    from sentencepiece import SentencePieceProcessor

    return SentencePieceProcessor(model_file=str(shared_fixture(LLAMA_TOKENIZER.name)))


@pytest.fixture(scope="module")
def vicuna(tmp_path_factory, sp):
    """(spec, gguf path, llama-cpp-python vocab) for a Vicuna v1.3-style folder."""
    root = tmp_path_factory.mktemp("vicuna")
    folder = make_folder(root, "vicuna-7b-v1.3", model=LLAMA_TOKENIZER, files={
        "tokenizer_config.json": VICUNA_TOKENIZER_CONFIG,
        "special_tokens_map.json": VICUNA_SPECIAL_TOKENS_MAP,
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    })
    spec = read_tokenizer(folder, chat_template="vicuna", vocab_size=32000)
    path = write_vocab_gguf(spec, root / "vicuna.gguf")
    return spec, path, load_vocab(path)


@pytest.fixture(scope="module")
def extended(tmp_path_factory, sp):
    """A folder with added tokens (two files) and an embedding padded to 32008 rows."""
    root = tmp_path_factory.mktemp("extended")
    config = dict(VICUNA_TOKENIZER_CONFIG)
    config["pad_token"] = "<pad>"
    config["added_tokens_decoder"] = {
        "0": {"content": "<unk>", "special": True},
        "1": {"content": "<s>", "special": True},
        "2": {"content": "</s>", "special": True},
        "32000": {"content": "<pad>", "special": True},
        "32001": {"content": "<|im_end|>", "special": False},
    }
    folder = make_folder(root, "extended", model=LLAMA_TOKENIZER, files={
        "tokenizer_config.json": config,
        "added_tokens.json": {"<pad>": 32000, "<|im_end|>": 32001, "\u2581shortquant": 32002},
    })
    spec = read_tokenizer(folder, vocab_size=32008)
    path = write_vocab_gguf(spec, root / "extended.gguf")
    return spec, path, load_vocab(path)


# ------------------------------------------------------------------- tokenization parity

@pytest.mark.parametrize("text", HARD_STRINGS)
def test_llama_cpp_tokenizes_like_sentencepiece(vicuna, sp, text):
    _, _, llm = vicuna
    expected = sp.encode(text)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == expected
    assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == [sp.bos_id()] + expected


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_llama_cpp_detokenizes_back(vicuna, sp, text):
    _, _, llm = vicuna
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # the strings are chosen to survive a sentencepiece round trip
    assert llama_detokenize(llm, ids).decode("utf-8") == text
    # llama-cpp-python's high-level detokenize keeps the dummy prefix unless BOS leads.
    assert llm.detokenize([sp.bos_id()] + ids).decode("utf-8") == text


def test_hard_strings_exercise_byte_fallback(sp):
    byte_ids = {i for i in range(sp.vocab_size()) if sp.is_byte(i)}
    used = {i for text in HARD_STRINGS for i in sp.encode(text)}
    assert len(used & byte_ids) >= 8


# ------------------------------------------------------------------------ vocabulary rules

def test_pieces_keep_ids_scores_and_types(vicuna, sp):
    spec, _, _ = vicuna
    assert spec.vocab_size == spec.n_pieces == sp.vocab_size() == 32000
    assert spec.n_padding == 0 and spec.added == ()
    for i in (0, 1, 2, 3, 258, 259, 500, 31999):
        assert spec.tokens[i] == sp.id_to_piece(i).encode("utf-8")
        assert spec.scores[i] == pytest.approx(sp.get_score(i))
    assert spec.token_types[0] == TokenType.UNKNOWN
    assert spec.token_types[1] == spec.token_types[2] == TokenType.CONTROL
    assert spec.token_types.count(TokenType.BYTE) == 256
    assert spec.tokens[3:259] == tuple(f"<0x{b:02X}>".encode() for b in range(256))
    assert spec.token_types.count(TokenType.NORMAL) == 32000 - 259
    assert spec.add_space_prefix is True


def test_metadata_lands_in_gguf(vicuna):
    spec, path, _ = vicuna
    fields = read_fields(path)
    assert fields[K.MODEL] == "llama"
    assert fields[K.PRE] == "default"
    assert len(fields[K.LIST]) == 32000 and fields[K.LIST][1] == "<s>"
    assert fields[K.TOKEN_TYPE][:4] == [TokenType.UNKNOWN, TokenType.CONTROL,
                                        TokenType.CONTROL, TokenType.BYTE]
    assert fields[K.SCORES][259] == pytest.approx(spec.scores[259])
    assert (fields[K.BOS_ID], fields[K.EOS_ID], fields[K.UNK_ID], fields[K.PAD_ID]) == (1, 2, 0, 0)
    assert (fields[K.ADD_BOS], fields[K.ADD_EOS], fields[K.ADD_PREFIX]) == (True, False, True)
    assert fields[K.CHAT_TEMPLATE] == CHAT_TEMPLATES["vicuna"]
    assert spec.chat_template_source == "built-in vicuna"


def test_llama_cpp_reads_special_ids(vicuna):
    _, _, llm = vicuna
    assert (llm.token_bos(), llm.token_eos(), llm.n_vocab()) == (1, 2, 32000)
    assert llm.metadata[K.CHAT_TEMPLATE] == CHAT_TEMPLATES["vicuna"]


def test_add_bos_and_eos_flags_follow_tokenizer_config(tmp_path, sp):
    folder = make_folder(tmp_path, "flags", {"tokenizer_config.json": {
        "add_bos_token": False, "add_eos_token": True}}, model=LLAMA_TOKENIZER)
    spec = read_tokenizer(folder)
    assert (spec.add_bos, spec.add_eos) == (False, True)
    path = write_vocab_gguf(spec, tmp_path / "flags.gguf")
    fields = read_fields(path)
    assert (fields[K.ADD_BOS], fields[K.ADD_EOS]) == (False, True)
    # llama.cpp honours them: "add special tokens" now means EOS at the end and no BOS.
    llm = load_vocab(path)
    assert llm.tokenize(b"Hello", add_bos=True, special=False) == sp.encode("Hello") + [2]


def test_llama_defaults_without_side_files(tmp_path):
    spec = read_tokenizer(make_folder(tmp_path, "bare"))
    assert (spec.add_bos, spec.add_eos) == (True, False)
    nulls = make_folder(tmp_path, "nulls", {"tokenizer_config.json": {
        "add_bos_token": None, "add_eos_token": None}})
    assert (read_tokenizer(nulls).add_bos, read_tokenizer(nulls).add_eos) == (True, False)
    assert (spec.bos_id, spec.eos_id, spec.unk_id, spec.pad_id) == (1, 2, 0, None)
    assert spec.chat_template is None and spec.chat_template_source is None


def test_added_tokens_take_their_ids_and_types(extended):
    spec, _, _ = extended
    assert spec.vocab_size == 32008 and spec.n_pieces == 32000
    assert spec.added == (
        (32000, "<pad>", TokenType.CONTROL),
        (32001, "<|im_end|>", TokenType.CONTROL),  # unflagged, but shaped like a marker
        (32002, " shortquant", TokenType.USER_DEFINED),  # '▁' written as a space
    )
    assert spec.tokens[32000:32003] == (b"<pad>", b"<|im_end|>", b" shortquant")
    assert spec.scores[32000] == -1000.0
    # The Hugging Face restatement of <unk>/<s>/</s> changes nothing.
    assert spec.token_types[:3] == (TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL)
    assert spec.pad_id == 32000


def test_summary_is_json(extended):
    spec, _, _ = extended
    summary = json.loads(json.dumps(spec.summary()))
    assert summary["vocab_size"] == 32008 and summary["padding"] == 5
    assert summary["added"][0] == {"id": 32000, "text": "<pad>", "type": "CONTROL"}
    assert (summary["bos_id"], summary["pad_id"], summary["chat_template"]) == (1, 32000, None)


def test_padding_fills_embedding_rows_with_unused_tokens(extended):
    spec, path, _ = extended
    assert spec.n_padding == 5
    assert spec.tokens[32003:] == tuple(f"[PAD{i}]".encode() for i in range(32003, 32008))
    assert set(spec.token_types[32003:]) == {TokenType.UNUSED}
    fields = read_fields(path)
    assert len(fields[K.LIST]) == 32008 and fields[K.LIST][-1] == "[PAD32007]"
    assert fields[K.PAD_ID] == 32000


def test_llama_cpp_sees_added_and_padding_tokens(extended, sp):
    import llama_cpp

    _, _, llm = extended
    assert llm.n_vocab() == 32008
    assert token_attr(llm, 32000) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    assert token_attr(llm, 32002) & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    assert token_attr(llm, 32005) & llama_cpp.LLAMA_TOKEN_ATTR_UNUSED
    # Control tokens are only parsed from text when asked; user-defined ones always are.
    assert llm.tokenize(b"a<pad>", add_bos=False, special=True) == sp.encode("a") + [32000]
    assert 32000 not in llm.tokenize(b"a<pad>", add_bos=False, special=False)
    assert 32002 in llm.tokenize(b"use shortquant", add_bos=False, special=False)
    # Padding tokens never match text: "[PAD32005]" is tokenized as sentencepiece does it.
    text = "see [PAD32005] here"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == sp.encode(text)


def test_added_token_beyond_the_embedding_is_left_out(tmp_path):
    folder = make_folder(tmp_path, "short", {"added_tokens.json": {"<pad>": 32000}}, model=LLAMA_TOKENIZER)
    spec = read_tokenizer(folder, vocab_size=32000)
    assert spec.vocab_size == 32000 and spec.added == ()
    assert any("<pad>" in w for w in spec.warnings)


def test_embedding_smaller_than_tokenizer_is_an_error(tmp_path):
    folder = make_folder(tmp_path, "small", model=LLAMA_TOKENIZER)
    with pytest.raises(TokenizerError, match="32000 pieces but the model's embedding has only 512"):
        read_tokenizer(folder, vocab_size=512)


def test_special_ids_by_name_win_over_numbers(tmp_path):
    # A decapoda-style config with wrong numeric ids: the names (and the model) are trusted.
    folder = make_folder(tmp_path, "names", {
        "tokenizer_config.json": {"bos_token": "<s>", "eos_token": "</s>"},
        "config.json": {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2},
    })
    spec = read_tokenizer(folder)
    assert (spec.bos_id, spec.eos_id, spec.unk_id) == (1, 2, 0)
    assert spec.pad_id == 2  # nothing better than config.json's number for pad


# --------------------------------------------------------------------------- chat templates

def render(template: str, messages, add_generation_prompt=False, **env_options) -> str:
    import jinja2

    env = jinja2.Environment(**env_options)
    return env.from_string(template).render(messages=messages, bos_token="<s>",
                                            eos_token="</s>",
                                            add_generation_prompt=add_generation_prompt)


TWO_TURNS = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi. How can I help?"},
    {"role": "user", "content": "Name a llama."},
    {"role": "assistant", "content": "Vicuna."},
]


def test_vicuna_template_renders_two_turns():
    expected = (
        "<s>A chat between a curious user and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: Hello! ASSISTANT: Hi. How can I help?</s>"
        "USER: Name a llama. ASSISTANT: Vicuna.</s>"
    )
    template = chat_template("vicuna")
    assert render(template, TWO_TURNS) == expected
    assert render(template, TWO_TURNS, trim_blocks=True, lstrip_blocks=True) == expected
    assert render(template, TWO_TURNS[:3], add_generation_prompt=True) == (
        expected.split("USER: Name")[0] + "USER: Name a llama. ASSISTANT:")


def test_vicuna_template_takes_a_system_message():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render(chat_template("vicuna"), messages, add_generation_prompt=True) == (
        "<s>Be brief. USER: Hi ASSISTANT:")
    assert VICUNA_SYSTEM_PROMPT not in render(chat_template("vicuna"), messages)


def test_vicuna_template_through_llama_cpp_python_formatter():
    formatter_module = pytest.importorskip("llama_cpp.llama_chat_format")
    formatter = formatter_module.Jinja2ChatFormatter(
        chat_template("vicuna"), eos_token="</s>", bos_token="<s>")
    prompt = formatter(messages=TWO_TURNS[:3]).prompt
    assert prompt.endswith("</s>USER: Name a llama. ASSISTANT:")
    assert prompt.startswith("<s>" + VICUNA_SYSTEM_PROMPT + " USER: Hello! ASSISTANT: ")


def test_llama_2_template_renders_two_turns():
    messages = [{"role": "system", "content": "Be brief."}] + TWO_TURNS[:3]
    assert render(chat_template("llama-2"), messages) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello! [/INST] Hi. How can I help? </s>"
        "<s>[INST] Name a llama. [/INST]")


def test_unknown_template_name_lists_known_ones(tmp_path):
    with pytest.raises(TokenizerError, match="unknown chat template 'alpaca'; known: "
                                             "llama-2, none, vicuna"):
        read_tokenizer(make_folder(tmp_path, "t", model=None), chat_template="alpaca")
    assert chat_template("none") is None


def test_template_from_tokenizer_config_wins(tmp_path):
    folder = make_folder(tmp_path, "own", {"tokenizer_config.json": {
        "chat_template": "{{ messages[0]['content'] }}"}})
    spec = read_tokenizer(folder, chat_template="vicuna")
    assert spec.chat_template == "{{ messages[0]['content'] }}"
    assert spec.chat_template_source == "tokenizer_config.json"


def test_named_template_list_lands_in_gguf(tmp_path):
    folder = make_folder(tmp_path, "named", {"tokenizer_config.json": {"chat_template": [
        {"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]}})
    spec = read_tokenizer(folder)
    assert spec.chat_template == (("default", "D"), ("tool_use", "T"))
    fields = read_fields(write_vocab_gguf(spec, tmp_path / "named.gguf"))
    assert fields[K.CHAT_TEMPLATE] == "D"
    assert fields[K.CHAT_TEMPLATE_N.format(name="tool_use")] == "T"


def test_chat_template_jinja_file_is_used(tmp_path):
    folder = make_folder(tmp_path, "jinja", {"chat_template.jinja": "{{ bos_token }}"})
    spec = read_tokenizer(folder, chat_template="vicuna")
    assert spec.chat_template == "{{ bos_token }}"


@pytest.mark.parametrize("bad", [42, {"default": "x"}, [{"name": "a"}]])
def test_bad_chat_template_in_tokenizer_config(tmp_path, bad):
    folder = make_folder(tmp_path, "bad", {"tokenizer_config.json": {"chat_template": bad}})
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat_template"):
        read_tokenizer(folder)


# ---------------------------------------------------------------------------------- errors

def assert_one_line_error(exc_info, path: Path, problem: str):
    message = str(exc_info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert problem in message
    error = exc_info.value
    # No sentencepiece / json exception chained behind ours (nothing to show in a traceback).
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_folder_without_tokenizer_model(tmp_path):
    with pytest.raises(TokenizerError) as exc_info:
        read_tokenizer(tmp_path)
    assert_one_line_error(exc_info, tmp_path, "no tokenizer.model")


@pytest.mark.parametrize("content", [
    os.urandom(4096),
    b"this is a text file, not a sentencepiece model\n" * 20,
    b"",
    b"\x0a\x05hello",  # a truncated protobuf
], ids=["random", "text", "empty", "truncated"])
def test_garbage_tokenizer_model(tmp_path, content):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(TokenizerError) as exc_info:
        read_tokenizer(tmp_path)
    assert_one_line_error(exc_info, tmp_path / "tokenizer.model", "not a sentencepiece model")


def test_tokenizer_config_that_is_not_json(tmp_path):
    folder = make_folder(tmp_path, "nojson", {"tokenizer_config.json": "{not json"})
    with pytest.raises(TokenizerError) as exc_info:
        read_tokenizer(folder)
    assert_one_line_error(exc_info, folder / "tokenizer_config.json", "not valid JSON")


def test_bad_added_token_id(tmp_path):
    folder = make_folder(tmp_path, "badid", {"added_tokens.json": {"<pad>": "32000"}})
    with pytest.raises(TokenizerError, match="added_tokens.json: added token '<pad>' has a bad id"):
        read_tokenizer(folder)
