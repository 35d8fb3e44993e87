"""Built-in chat templates (Jinja), for checkpoints whose tokenizer_config.json has none.

Pruned LLaMA/Vicuna releases often ship without a ``chat_template``; the GGUF still needs one
so llama.cpp / llama-cpp-python format conversations the way the model was fine-tuned.

The templates follow Hugging Face's conventions: they receive ``messages`` (a list of
``{"role", "content"}``), ``bos_token``, ``eos_token`` and ``add_generation_prompt``, and they
emit the BOS token themselves, because chat front ends (transformers' ``apply_chat_template``,
llama-cpp-python's ``Jinja2ChatFormatter``) tokenize the rendered prompt without adding one.
Every tag trims whitespace (``{%- -%}``), so the output is the same with or without
``trim_blocks`` / ``lstrip_blocks``.

    >>> from shortquant.chat_templates import chat_template
    >>> "ASSISTANT:" in chat_template("vicuna")
    True
"""

from __future__ import annotations

from shortquant.errors import TokenizerError
from shortquant.suggest import unknown_name

VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Vicuna v1.1 (FastChat "vicuna_v1.1", used by Vicuna v1.1, v1.3 and v1.5):
#   "<s>{system} USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT:"
# A leading system message replaces the default system prompt.
VICUNA = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + VICUNA_SYSTEM_PROMPT.replace("'", "\\'") + "' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- if system -%}{{- system + ' ' -}}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' + message['content'] + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Llama-2-chat (Meta's reference format):
#   "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{u1} [/INST] {a1} </s><s>[INST] {u2} [/INST]"
LLAMA_2 = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set content = message['content'] | trim -%}"
    "{%- if loop.first and system -%}"
    "{%- set content = '<<SYS>>\\n' + system | trim + '\\n<</SYS>>\\n\\n' + content -%}"
    "{%- endif -%}"
    "{{- bos_token + '[INST] ' + content + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + message['content'] | trim + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# name -> template; None means "write no template".
CHAT_TEMPLATES: dict[str, str | None] = {
    "vicuna": VICUNA,
    "llama-2": LLAMA_2,
    "none": None,
}


def chat_template(name: str) -> str | None:
    """The built-in template called ``name`` (``None`` for ``"none"``).

    Raises ``TokenizerError`` listing the known names when ``name`` is not one of them.

        >>> chat_template("none") is None
        True
    """
    key = name.strip().lower()
    if key not in CHAT_TEMPLATES:
        raise TokenizerError(unknown_name("chat template", name, sorted(CHAT_TEMPLATES), listed="known"))
    return CHAT_TEMPLATES[key]
