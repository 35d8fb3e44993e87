"""Builders for the family tests: tiny random checkpoints of each family, and small byte-level BPE
tokenizers trained on the package's evaluation text with the same pre-tokenizer rules as Llama-3
and Qwen2 (so llama.cpp's ``llama-bpe`` / ``qwen2`` pre-tokenizers split text as they do)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

EVAL_TEXT = Path(__file__).resolve().parents[1] / "shortquant" / "evaluate" / "data" / "eval_text.txt"

# The split patterns of Llama-3's and Qwen2's tokenizer.json (facts of those tokenizers).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Tekken's (Mistral-NeMo, Mistral-NeMo-Minitron-8B): letters split by case runs, digits one by one
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]{{ m['content'] }}"
                    "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

STYLES = {
    # style: (split pattern, special tokens, bos, eos, template, pre-tokenizer name in llama.cpp)
    "llama3": (LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                              "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>",
               LLAMA3_TEMPLATE, "llama-bpe"),
    "qwen2": (QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>",
              CHATML_TEMPLATE, "qwen2"),
    # Tekken's tokenizer.json: BPE with ignore_merges (a whole-word token wins), <s> added
    "tekken": (TEKKEN_SPLIT, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>",
               MISTRAL_TEMPLATE, "tekken"),
}


def make_bpe_tokenizer(folder: Path, style: str = "llama3", vocab_size: int = 400) -> int:
    """Train a byte-level BPE tokenizer in ``folder`` (tokenizer.json + tokenizer_config.json);
    returns its size including the special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    split, specials, bos, eos, template, _ = STYLES[style]
    tok = Tokenizer(models.BPE(ignore_merges=style == "tekken"))
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(EVAL_TEXT.read_text(encoding="utf-8").splitlines(), trainer)
    tok.add_special_tokens(specials)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, "add_bos_token": bool(bos), "chat_template": template,
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return tok.get_vocab_size()


def build_family_model(family: str, vocab_size: int, *, layers: int = 4, seed: int = 0, **overrides):
    """A random transformers model of ``family`` (llama, mistral, qwen2, qwen3, nemotron) in f32, eval mode,
    with perturbed norms and biases so a wrong mapping shows in the logits."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
               "nemotron": ("NemotronConfig", "NemotronForCausalLM")}
    config_cls, model_cls = (getattr(transformers, n) for n in classes[family])
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                  rms_norm_eps=1e-5, initializer_range=0.05, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.05)
    return model
