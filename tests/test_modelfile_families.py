"""ollama Modelfiles for the Llama-3 and ChatML (Qwen) families: the family is found from the
tokens a GGUF's Jinja template writes, and the Go template renders a conversation exactly as that
Jinja template does (the interpreter and ollama's data are test_publish_modelfile's)."""

from __future__ import annotations

import re

import pytest

from families import CHATML_TEMPLATE, LLAMA3_TEMPLATE
from publish_helpers import make_gguf
from shortquant.publish.modelfile import OLLAMA_TEMPLATES, modelfile_text, template_family, write_modelfiles
from test_publish_modelfile import BOS, TWO_TURNS, WITH_SYSTEM, render_jinja, render_ollama

# Qwen2.5's template shape: a default system prompt, tools: still ChatML for a plain chat
QWEN_LIKE = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
             "'<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if message.role != 'system' %}"
             "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}"
             "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.mark.parametrize("messages", [TWO_TURNS, WITH_SYSTEM], ids=["no-system", "system"])
@pytest.mark.parametrize("jinja, family, bos", [(LLAMA3_TEMPLATE, "llama3", BOS), (CHATML_TEMPLATE, "chatml", ""),
                                                (QWEN_LIKE, "chatml", "")], ids=["llama3", "chatml", "qwen-like"])
def test_go_template_renders_like_the_jinja_template(tmp_path, jinja, family, bos, messages):
    path = make_gguf(tmp_path / "M-1B-Q8_0.gguf", "Q8_0", chat_template=jinja)
    written = write_modelfiles(tmp_path)
    assert template_family(jinja) == family
    text = (tmp_path / "M-1B-Q8_0.Modelfile").read_text()
    go = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    assert go == OLLAMA_TEMPLATES[family].template and "SYSTEM" not in text
    # ollama adds BOS itself when the model's vocabulary asks for it
    assert bos + render_ollama(go, messages, None) == render_jinja(jinja, messages)
    for stop in OLLAMA_TEMPLATES[family].stop:
        assert f'PARAMETER stop "{stop}"' in text
    assert (tmp_path / "template").read_text() == go and path.name in text
    assert {p.name for p in written} >= {"template", "params"}


def test_a_template_with_only_some_of_the_tokens_is_left_to_ollama():
    assert template_family("{{ '<|im_start|>' + messages[0]['content'] }}") is None
    assert "TEMPLATE" not in modelfile_text("x.gguf", template_family("<|start_header_id|> only"))
