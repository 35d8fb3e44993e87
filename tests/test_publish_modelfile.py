"""ollama Modelfiles: the Go template renders a conversation exactly as the GGUF's Jinja template.

The Jinja side is rendered twice: with jinja2 (as transformers does) and with llama-cpp-python's
own chat formatter when it is installed. The Go side is rendered by the small interpreter below,
which implements the subset of text/template our templates use (if / else if / else / end,
range, eq, field access, whitespace trimming) with Go's semantics, the way ollama calls it:
``.System`` holds the system prompt and ``.Messages`` every message, system ones included.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from publish_helpers import make_gguf
from shortquant.chat_templates import VICUNA_SYSTEM_PROMPT, chat_template
from shortquant.publish.modelfile import (OLLAMA_TEMPLATES, modelfile_name, modelfile_text,
                                          template_family, write_modelfiles)

BOS, EOS = "<s>", "</s>"


# --- a tiny Go text/template interpreter -------------------------------------------------

_ACTION = re.compile(r"\{\{(-?)\s?(.*?)\s?(-?)\}\}", re.S)


def _tokens(template: str):
    """Text and action tokens with Go's trim markers applied ("{{- " / " -}}")."""
    out, pos = [], 0
    for m in _ACTION.finditer(template):
        out.append(["text", template[pos:m.start()]])
        if m.group(1) and out[-1][0] == "text":
            out[-1][1] = out[-1][1].rstrip(" \t\r\n")
        out.append(["action", m.group(2).strip(), bool(m.group(3))])
        pos = m.end()
    out.append(["text", template[pos:]])
    for i, tok in enumerate(out):   # right trim applies to the following text
        if tok[0] == "action" and tok[2] and i + 1 < len(out):
            out[i + 1][1] = out[i + 1][1].lstrip(" \t\r\n")
    return [(t[0], t[1]) for t in out]


def _parse(tokens, i=0, stop=("end",)):
    """Parse until one of ``stop`` keywords; returns (nodes, index of the stop token)."""
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        word = value.split()[0]
        if word in stop or value.startswith("else"):
            return nodes, i
        if word == "if":
            branches, i = [], i
            cond = value[2:].strip()
            while True:
                body, i = _parse(tokens, i + 1)
                branches.append((cond, body))
                _, action = tokens[i]
                if action.startswith("else if"):
                    cond = action[len("else if"):].strip()
                elif action == "else":
                    cond = None
                else:   # end
                    break
            nodes.append(("if", branches))
            i += 1
        elif word == "range":
            body, i = _parse(tokens, i + 1)
            nodes.append(("range", value[len("range"):].strip(), body))
            i += 1
        else:
            nodes.append(("expr", value))
            i += 1
    return nodes, i


def _arg(expr: str, dot: dict, root: dict):
    if expr.startswith('"'):
        return json.loads(expr)
    if expr.startswith("$."):
        return root[expr[2:]]
    if expr.startswith("."):
        return dot[expr[1:]]
    raise ValueError(f"unsupported expression {expr!r}")


def _eval(expr: str, dot: dict, root: dict):
    parts = shlex.split(expr, posix=False)
    if parts[0] == "eq":
        first = _arg(parts[1], dot, root)
        return any(first == _arg(p, dot, root) for p in parts[2:])
    if len(parts) == 1:
        return _arg(parts[0], dot, root)
    raise ValueError(f"unsupported expression {expr!r}")


def _run(nodes, dot, root) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            out.append(str(_eval(node[1], dot, root)))
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond is None or _eval(cond, dot, root):
                    out.append(_run(body, dot, root))
                    break
        elif node[0] == "range":
            for item in _eval(node[1], dot, root):
                out.append(_run(node[2], item, root))
    return "".join(out)


def render_go(template: str, data: dict) -> str:
    nodes, end = _parse(_tokens(template))
    tokens = _tokens(template)
    assert end == len(tokens), "unbalanced template"
    return _run(nodes, data, data)


def render_ollama(template: str, messages: list[dict], default_system: str | None) -> str:
    """What ollama feeds the Go template: the Modelfile SYSTEM is prepended when the chat has no
    system message; .System joins the system messages; .Messages keeps all of them."""
    if default_system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": default_system}] + messages
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return render_go(template, data)


def test_go_interpreter_follows_go_trimming():
    assert render_go("a  {{- .X -}}  b", {"X": 1}) == "a1b"
    assert render_go("{{ if .X }}yes{{ else if eq .Y \"k\" }}k{{ else }}no{{ end }}", {"X": "", "Y": "k"}) == "k"
    assert render_go("{{ range .M }}[{{ .A }}]{{ end }}", {"M": [{"A": 1}, {"A": 2}]}) == "[1][2]"


# --- the templates -------------------------------------------------------------------------

def render_jinja(template: str, messages: list[dict]) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=BOS, eos_token=EOS)


TWO_TURNS = [
    {"role": "user", "content": "Hello! Who are you?"},
    {"role": "assistant", "content": "I am a pruned Vicuna."},
    {"role": "user", "content": "How many blocks do you have?"},
]
WITH_SYSTEM = [{"role": "system", "content": "Answer in one word."}] + TWO_TURNS


@pytest.fixture
def vicuna_gguf(tmp_path):
    return make_gguf(tmp_path / "St-Vicuna-v1.3-5.5B-Taylor-Q8_0.gguf", "Q8_0",
                     chat_template=chat_template("vicuna"))


@pytest.mark.parametrize("messages", [TWO_TURNS, WITH_SYSTEM], ids=["default-system", "own-system"])
def test_modelfile_template_renders_like_gguf_chat_template(vicuna_gguf, messages):
    import gguf

    reader = gguf.GGUFReader(vicuna_gguf)
    jinja_template = reader.fields[gguf.Keys.Tokenizer.CHAT_TEMPLATE].contents()
    family = template_family(jinja_template)
    assert family == "vicuna"
    spec = OLLAMA_TEMPLATES[family]

    # Take the template and system prompt from the Modelfile text itself, as ollama would.
    text = modelfile_text(vicuna_gguf.name, family)
    go_template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M).group(1)
    assert go_template == spec.template and system == VICUNA_SYSTEM_PROMPT

    expected = render_jinja(jinja_template, messages)
    # ollama's tokenizer adds BOS itself, so the Go template leaves it out.
    assert BOS + render_ollama(go_template, messages, system) == expected
    if messages is TWO_TURNS:
        assert expected == (f"{BOS}{VICUNA_SYSTEM_PROMPT} USER: Hello! Who are you? ASSISTANT: "
                            f"I am a pruned Vicuna.{EOS}USER: How many blocks do you have? ASSISTANT:")


def test_llama_cpp_python_formats_the_same_prompt(vicuna_gguf):
    formatter_module = pytest.importorskip("llama_cpp.llama_chat_format")
    formatter = formatter_module.Jinja2ChatFormatter(template=chat_template("vicuna"),
                                                     eos_token=EOS, bos_token=BOS)
    prompt = formatter(messages=TWO_TURNS).prompt
    spec = OLLAMA_TEMPLATES["vicuna"]
    assert prompt == BOS + render_ollama(spec.template, TWO_TURNS, spec.system)


def test_write_modelfiles_and_ollama_root_files(vicuna_gguf):
    folder = vicuna_gguf.parent
    other = make_gguf(folder / "St-Vicuna-v1.3-5.5B-Taylor-Q4_0.gguf", "Q4_0",
                      chat_template=chat_template("vicuna"))
    written = {p.name for p in write_modelfiles(folder)}
    assert written == {modelfile_name(vicuna_gguf), modelfile_name(other), "template", "system", "params"}
    modelfile = (folder / modelfile_name(other)).read_text()
    assert modelfile.startswith(f"FROM ./{other.name}\n")
    assert 'PARAMETER stop "</s>"' in modelfile
    assert (folder / "template").read_text() == OLLAMA_TEMPLATES["vicuna"].template
    assert (folder / "system").read_text() == VICUNA_SYSTEM_PROMPT
    assert json.loads((folder / "params").read_text()) == {"stop": ["</s>", "USER:"]}


def test_base_model_gets_no_template_and_stale_root_files_go(vicuna_gguf):
    folder = vicuna_gguf.parent
    write_modelfiles(folder)
    assert (folder / "template").exists()
    vicuna_gguf.unlink()
    base = make_gguf(folder / "St-LLaMA-1-5.5B-PPL-Q8_0.gguf", "Q8_0", chat_template=None)
    written = write_modelfiles(folder)
    assert [p.name for p in written] == [modelfile_name(base)]
    text = (folder / modelfile_name(base)).read_text()
    assert "TEMPLATE" not in text and text.startswith(f"FROM ./{base.name}")
    assert not (folder / "template").exists() and not (folder / "params").exists()


def test_unknown_jinja_template_is_left_to_ollama():
    assert template_family("{{ messages[0]['content'] }}") is None
    assert "TEMPLATE" not in modelfile_text("x.gguf", None)
