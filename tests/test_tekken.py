"""Mistral-NeMo-Minitron-8B's tokenizer: Tekken (``tokenizer.ggml.pre = tekken``). A byte-level
BPE built the way Tekken's tokenizer.json is (its split pattern, ``ignore_merges``, ``<s>`` added
by the post-processor) tokenizes in llama.cpp exactly as in the tokenizers library."""

from __future__ import annotations

import gguf
from click.testing import CliRunner

from families import build_family_model, make_bpe_tokenizer
from shortquant.cli import main

TEXTS = ["HelloWORLD camelCase XMLHttpRequest iPhone", "numbers 1 12 123 1234 and 3.14",
         "Once upon a time, there was a little girl.", "  two  spaces\tand\n\nlines /path/to\n",
         "don't I'll THEY'RE", "日本語 🦙 ok", "[INST] a special token [/INST]"]


def test_tekken_tokenizes_as_hugging_face(tmp_path):
    import llama_cpp
    from tokenizers import Tokenizer

    src = tmp_path / "src"
    vocab = make_bpe_tokenizer(src, "tekken")
    build_family_model("mistral", vocab, layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=1).save_pretrained(src)
    result = CliRunner().invoke(main, ["export", str(src), "--out", str(tmp_path / "out"), "--pre", "tekken",
                                       "-q", "f16", "--quiet"])
    assert result.exit_code == 0, result.output
    path = next((tmp_path / "out").glob("*.gguf"))
    reader = gguf.GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.pre").contents() == "tekken"
    assert reader.get_field("tokenizer.ggml.add_bos_token").contents() is True
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    hf = Tokenizer.from_file(str(src / "tokenizer.json"))
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf.encode(text).ids, text
