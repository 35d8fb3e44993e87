"""ollama Modelfiles and the files ollama reads from a Hugging Face repo root.

ollama speaks Go templates, not Jinja. For each chat-template family we know (the built-in
Jinja templates of :mod:`shortquant.chat_templates`), this module holds the equivalent Go
template, the default system prompt and the stop strings; a GGUF's family is found by
comparing its ``tokenizer.chat_template`` with the built-in ones. The Go templates use
``.Messages`` so a whole conversation renders in one pass, exactly as the Jinja template does
(ollama adds the BOS token itself when it tokenizes, so the Go template leaves it out).

For ``ollama run hf.co/user/repo``, ollama reads from the repo root a ``template`` file (Go
template), a ``system`` file (default system prompt) and a ``params`` file (JSON sampling
parameters such as ``stop``); see https://huggingface.co/docs/hub/ollama.

    >>> from shortquant.publish.modelfile import modelfile_text
    >>> print(modelfile_text("m-Q4_K_M.gguf", "vicuna").splitlines()[0])
    FROM ./m-Q4_K_M.gguf
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from shortquant.chat_templates import CHAT_TEMPLATES, VICUNA_SYSTEM_PROMPT
from shortquant.errors import PublishError


@dataclass(frozen=True)
class OllamaTemplate:
    """The ollama side of one chat-template family."""

    template: str                 # Go template over .System and .Messages
    system: str | None            # default system prompt (the Jinja template's default)
    stop: tuple[str, ...]         # PARAMETER stop values


# Vicuna v1.1: "{system} USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT:".
# System messages are skipped inside the range: ollama passes them in .System.
# No "{{-" right after text that ends in a meaningful space: it would trim that space.
_VICUNA_GO = (
    '{{- if .System }}{{ .System }} {{ end }}'
    '{{- range .Messages }}'
    '{{- if eq .Role "user" }}USER: {{ .Content }} '
    '{{ else if eq .Role "assistant" }}ASSISTANT: {{ .Content }}</s>'
    '{{ end }}'
    '{{- end }}ASSISTANT:'
)

# Llama-3 / 3.x Instruct: a header per message (system messages included, in order), then the
# assistant's header. Its Jinja starts with BOS, which ollama adds itself.
_LLAMA3_GO = (
    '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
    '{{ .Content }}<|eot_id|>'
    '{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n'
)

# ChatML (Qwen2, Qwen2.5, Qwen3, SmolLM2-Instruct): "<|im_start|>{role}\n{content}<|im_end|>\n" each.
_CHATML_GO = (
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n'
    '{{ .Content }}<|im_end|>\n'
    '{{ end }}<|im_start|>assistant\n'
)

OLLAMA_TEMPLATES: dict[str, OllamaTemplate] = {
    "vicuna": OllamaTemplate(template=_VICUNA_GO, system=VICUNA_SYSTEM_PROMPT,
                             stop=("</s>", "USER:")),
    "llama3": OllamaTemplate(template=_LLAMA3_GO, system=None,
                             stop=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
    "chatml": OllamaTemplate(template=_CHATML_GO, system=None, stop=("<|im_start|>", "<|im_end|>")),
}

# Families recognised by the tokens their Jinja templates write (hub templates differ in tools,
# dates and thinking blocks, so no text comparison could find them): (family, tokens all present).
_MARKERS = (("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
            ("chatml", ("<|im_start|>", "<|im_end|>")))

# Files ollama reads from the root of a hub repo.
OLLAMA_TEMPLATE_FILE = "template"
OLLAMA_SYSTEM_FILE = "system"
OLLAMA_PARAMS_FILE = "params"


def template_family(chat_template: str | None) -> str | None:
    """The name of the built-in family whose Jinja text equals ``chat_template``, or the
    Llama-3 / ChatML family whose tokens it writes, else None.

    >>> from shortquant.chat_templates import chat_template
    >>> template_family(chat_template("vicuna"))
    'vicuna'
    """
    if not chat_template:
        return None
    for name, text in CHAT_TEMPLATES.items():
        if text is not None and text.strip() == chat_template.strip():
            return name
    for name, tokens in _MARKERS:
        if all(t in chat_template for t in tokens):
            return name
    return None


def gguf_chat_template(path: str | Path) -> str | None:
    """``tokenizer.chat_template`` of a GGUF file, or None."""
    from shortquant.gguf_check import read_gguf_checked

    reader = read_gguf_checked(Path(path), PublishError)   # counts checked first; one line for any damage
    field = reader.fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    return str(field.contents()) if field is not None else None


def _quote(text: str) -> str:
    # Modelfile values in triple quotes may hold anything but a triple quote.
    if '"""' in text:
        raise PublishError("a template or system prompt contains '\"\"\"', which a Modelfile cannot hold")
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, family: str | None) -> str:
    """The Modelfile for one GGUF file (given by its name, relative to the Modelfile).

    An unknown family gets no TEMPLATE: ollama then picks a template from the GGUF's own
    ``tokenizer.chat_template``; no template at all means plain completion.
    """
    from shortquant.gguf_info import parse_split_name

    lines = [f"FROM ./{gguf_name}", ""]
    if parse_split_name(gguf_name):
        lines = ["# ollama cannot load split GGUF files: merge the parts first with",
                 f"#   llama-gguf-split --merge {gguf_name} merged.gguf",
                 "# and point FROM at the merged file.", *lines]
    spec = OLLAMA_TEMPLATES.get(family) if family else None
    if spec is None:
        lines.append("# No known chat template: ollama uses the GGUF's own metadata "
                     "(plain text completion when there is none).")
        return "\n".join(lines) + "\n"
    lines.append(f"TEMPLATE {_quote(spec.template)}")
    if spec.system:
        lines.append(f"SYSTEM {_quote(spec.system)}")
    for stop in spec.stop:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"


def modelfile_name(gguf_path: str | Path) -> str:
    """``<stem>.Modelfile`` for a GGUF (the first part's name for split files).

    >>> modelfile_name("out/St-Vicuna-v1.3-5.5B-Taylor-Q4_K_M.gguf")
    'St-Vicuna-v1.3-5.5B-Taylor-Q4_K_M.Modelfile'
    """
    return Path(gguf_path).name.removesuffix(".gguf") + ".Modelfile"


def write_modelfiles(outdir: str | Path, gguf_files: list[Path] | None = None) -> list[Path]:
    """Write one Modelfile per GGUF in ``outdir`` plus ollama's repo-root files.

    The root files (``template``, ``system``, ``params``) are written when all GGUFs share one
    known family; stale ones from an earlier run are removed otherwise. Returns written paths.

        >>> write_modelfiles("out/st-vicuna")     # doctest: +SKIP
    """
    from shortquant.gguf_info import parse_split_name

    outdir = Path(outdir)
    if gguf_files is None:
        gguf_files = sorted(p for p in outdir.glob("*.gguf")
                            if (parse_split_name(p) or ("", 0, 1))[1] == 0)
    written = []
    families = set()
    for path in gguf_files:
        family = template_family(gguf_chat_template(path))
        families.add(family)
        target = outdir / modelfile_name(path)
        target.write_text(modelfile_text(Path(path).name, family), encoding="utf-8")
        written.append(target)

    root = {name: outdir / name for name in (OLLAMA_TEMPLATE_FILE, OLLAMA_SYSTEM_FILE, OLLAMA_PARAMS_FILE)}
    spec = OLLAMA_TEMPLATES.get(families.pop()) if len(families) == 1 else None
    for path in root.values():
        path.unlink(missing_ok=True)
    if spec is not None:
        root[OLLAMA_TEMPLATE_FILE].write_text(spec.template, encoding="utf-8")
        written.append(root[OLLAMA_TEMPLATE_FILE])
        if spec.system:
            root[OLLAMA_SYSTEM_FILE].write_text(spec.system, encoding="utf-8")
            written.append(root[OLLAMA_SYSTEM_FILE])
        root[OLLAMA_PARAMS_FILE].write_text(json.dumps({"stop": list(spec.stop)}, indent=2) + "\n",
                                            encoding="utf-8")
        written.append(root[OLLAMA_PARAMS_FILE])
    return written
