"""The model card (README.md) for a folder of exported GGUF files.

Everything on the card comes from the files themselves (their GGUF metadata, sizes and
sha256 sums), from the recipe of the release when there is one, and from the verify stage's
``results.json`` when it exists. The card starts with YAML front matter the hub understands
(base model and relation, license, tags, ...), so the repo is linked to its base model and
shows up under its quantizations.

    >>> from shortquant.publish.card import write_card
    >>> write_card("out/st-vicuna", recipe="st-vicuna-v1.3-5.5b-taylor")   # doctest: +SKIP
    PosixPath('out/st-vicuna/README.md')
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import gguf

from shortquant import keys
from shortquant.checksum import sha256_file
from shortquant.gguf_info import GGUFFile, find_models, parse_split_name
from shortquant.errors import PublishError
from shortquant.hub import HUB
from shortquant.partfiles import write_atomic
from shortquant.publish.modelfile import modelfile_name, template_family
from shortquant.recipes import Recipe, RecipeError, load_recipe
from shortquant.sizes import format_size

DEFAULT_QUANTIZED_BY = "shortquant"

# What each type is, for the "Use" column: true of the type on any model (sizes and quality
# on this model are the table's measured columns). One entry per type llama-quantize offers.
_NEEDS_IMATRIX = "made with an importance matrix (llama.cpp requires one)"
TYPE_NOTES = {
    "F32": "full precision; the reference",
    "F16": "16-bit; reference quality",
    "BF16": "16-bit (bfloat); reference quality",
    "Q8_0": "8-bit; near-lossless",
    "Q6_K": "6-bit; very close to 16-bit",
    "Q5_K_M": "5-bit mix; high quality",
    "Q5_K_S": "5-bit; high quality, a little smaller",
    "Q5_1": "legacy 5-bit; kept for compatibility",
    "Q5_0": "legacy 5-bit; kept for compatibility",
    "Q4_K_M": "4-bit mix; the usual balance of size and quality",
    "Q4_K_S": "4-bit; a little smaller, slightly lower quality",
    "Q4_1": "legacy 4-bit; kept for compatibility",
    "Q4_0": "legacy 4-bit; fast on some CPUs",
    "IQ4_NL": "4-bit non-linear",
    "IQ4_XS": "compact 4-bit non-linear",
    "Q3_K_L": "3-bit mix, largest; noticeable quality loss",
    "Q3_K_M": "3-bit mix; noticeable quality loss",
    "Q3_K_S": "3-bit; clear quality loss",
    "IQ3_M": "3-bit i-quant mix; noticeable quality loss",
    "IQ3_S": "3-bit i-quant; noticeable quality loss",
    "IQ3_XS": "3-bit i-quant, smaller; clear quality loss",
    "IQ3_XXS": f"3-bit i-quant, smallest; {_NEEDS_IMATRIX}",
    "Q2_K": "2-bit mix; large quality loss",
    "Q2_K_S": f"2-bit, smaller; {_NEEDS_IMATRIX}",
    "IQ2_M": f"2-bit i-quant; large quality loss; {_NEEDS_IMATRIX}",
    "IQ2_S": f"2-bit i-quant; large quality loss; {_NEEDS_IMATRIX}",
    "IQ2_XS": f"2-bit i-quant; large quality loss; {_NEEDS_IMATRIX}",
    "IQ2_XXS": f"2-bit i-quant; large quality loss; {_NEEDS_IMATRIX}",
    "IQ1_M": f"1-bit i-quant; for experiments, most quality is lost; {_NEEDS_IMATRIX}",
    "IQ1_S": f"1-bit i-quant; for experiments, most quality is lost; {_NEEDS_IMATRIX}",
    "TQ2_0": "ternary; only for models trained ternary (BitNet b1.58), others lose most of their quality",
    "TQ1_0": "ternary; only for models trained ternary (BitNet b1.58), others lose most of their quality",
}
RECOMMENDED_TYPE = "Q4_K_M"
# With measurements, the recommended file is the smallest whose top-1 token agrees with the
# reference at least this often.
RECOMMEND_MIN_TOP1 = 0.90


def type_note(type_name: str) -> str:
    """The "Use" text of a file type; a type newer than this table still gets a true sentence."""
    if type_name.endswith(keys.OPT_SUFFIX):
        return (f"a measured variant of {type_name[:-4]}: each tensor's type chosen by measuring this model, "
                "within a byte budget (shortquant export --optimize)")
    return TYPE_NOTES.get(type_name) or f"llama.cpp type {type_name}; see the measured columns"


def _versus_base_mix(model, models, measured: dict[str, dict]) -> str:
    """For a measured _OPT file whose standard mix is measured too: how its KLD compares."""
    if not model.type.endswith(keys.OPT_SUFFIX):
        return ""
    base = next((m for m in models if m.type == model.type[:-4]), None)
    ours = (measured.get(model.name) or {}).get("kld")
    theirs = (measured.get(base.name) or {}).get("kld") if base is not None else None
    if not ours or not theirs or theirs["mean"] <= 0:
        return ""
    change = (max(ours["mean"], 0.0) / theirs["mean"] - 1) * 100
    size = "smaller" if model.bytes < base.bytes else "the same size" if model.bytes == base.bytes else "larger"
    return f"; KLD {change:+.0f} % against {base.type} ({size})"


def _ranges(indices) -> str:
    """'0-23, 30-31' for [0..23, 30, 31]."""
    indices = sorted(indices)
    out, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            out.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(out)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _hub_link(repo_id: str) -> str:
    return f"[{repo_id}]({HUB}/{repo_id})"


def _base_model_from_gguf(model: GGUFFile) -> str | None:
    url = model.get(gguf.Keys.General.BASE_MODEL_REPO_URL.format(id=0))
    if url and str(url).startswith(HUB + "/"):
        return str(url)[len(HUB) + 1:].strip("/")
    org = model.get(gguf.Keys.General.BASE_MODEL_ORGANIZATION.format(id=0))
    name = model.get(gguf.Keys.General.BASE_MODEL_NAME.format(id=0))
    return f"{org}/{name}" if org and name else None


def _resolve_recipe(recipe, models: list[GGUFFile]) -> Recipe | None:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe:
        return load_recipe(recipe)
    named = {m.get(keys.RECIPE) for m in models} - {None, ""}
    if len(named) == 1:
        try:
            return load_recipe(named.pop())
        except RecipeError:
            return None
    return None


def _resolve_results(results, outdir: Path) -> dict | None:
    from shortquant.evaluate.results import read_results

    if isinstance(results, dict):
        return results
    if results is None:
        default = outdir / "results.json"
        return read_results(default) if default.is_file() else None
    return read_results(results)


def _results_by_file(results: dict | None, models: list[GGUFFile]) -> dict[str, dict]:
    """results.json entries keyed by model name (first part for split sets)."""
    if not results:
        return {}
    entries = {Path(e["file"]).name: e for e in results.get("files", [])}
    out = {}
    for model in models:
        candidates = [model.name]
        parsed = parse_split_name(model.path)
        if parsed:
            candidates.append(parsed[0] + ".gguf")
        for name in candidates:
            if name in entries:
                out[model.name] = entries[name]
                break
    return out


def _recommendation(models: list[GGUFFile], measured: dict[str, dict]) -> tuple[str | None, str]:
    """The recommended file's name and the rule that chose it, as a sentence for the card."""
    agreeing = [m for m in models
                if (measured.get(m.name) or {}).get("kld")
                and measured[m.name]["kld"].get("same_top1", 0) >= RECOMMEND_MIN_TOP1]
    threshold = f"{RECOMMEND_MIN_TOP1:.0%}".replace("%", " %")
    if agreeing:
        pick = min(agreeing, key=lambda m: (m.bytes, measured[m.name]["kld"]["mean"]))   # a tie: closer wins
        top1 = 100 * measured[pick.name]["kld"]["same_top1"]
        return pick.name, (f"Recommended file: {pick.type}, the smallest file whose most likely next token "
                           f"matches the reference's at least {threshold} of the time (measured: {top1:.1f} %).")
    fallback = next((m for m in models if m.type == RECOMMENDED_TYPE), None)
    measured_any = any((measured.get(m.name) or {}).get("kld") for m in models)
    why = (f"no file's most likely next token matches the reference's {threshold} of the time"
           if measured_any else "nothing was measured against a reference")
    if fallback is not None:
        return fallback.name, (f"Recommended file: {RECOMMENDED_TYPE}, the usual balance of size and quality "
                               f"for llama.cpp ({why}).")
    return None, f"No file is recommended: {why}, and there is no {RECOMMENDED_TYPE} file."


def _recommended(models: list[GGUFFile], measured: dict[str, dict]) -> str | None:
    return _recommendation(models, measured)[0]


def _dominated_by(models: list[GGUFFile], measured: dict[str, dict]) -> dict[str, GGUFFile]:
    """File name -> the smallest other file no larger and at least as close to the reference (KLD),
    and better in one of the two: the same rule as the report plot's Pareto front."""
    kld = {m.name: measured[m.name]["kld"]["mean"] for m in models if (measured.get(m.name) or {}).get("kld")}
    out = {}
    for m in models:
        if m.name not in kld:
            continue
        better = [o for o in models if o.name in kld and o.name != m.name and o.bytes <= m.bytes
                  and kld[o.name] <= kld[m.name] and (o.bytes < m.bytes or kld[o.name] < kld[m.name])]
        if better:
            out[m.name] = min(better, key=lambda o: (o.bytes, kld[o.name]))
    return out


def card_metadata(models: list[GGUFFile], recipe: Recipe | None, quantized_by: str, *,
                  base_model: str | None = None, license: str | None = None) -> dict:
    """The YAML front matter as a dict (keys the hub reads).

    Base model and license come from ``base_model``/``license`` when given, else the recipe,
    else the files' own ``general.base_model.*`` / ``general.license`` (which an export takes
    from the source's README.md front matter). A license nobody stated is ``unknown``, a
    value the hub accepts, so the card says so rather than leaving the field out.
    """
    first = models[0] if models else None
    if base_model is None and recipe is not None:
        base_model = recipe.hub_id or recipe.base_model
    elif base_model is None and first is not None:
        base_model = _base_model_from_gguf(first)
    license_id = recipe.license if recipe else (first.get(gguf.Keys.General.LICENSE) if first else None)
    if license:
        license_id = license
    license_name = recipe.license_name if recipe else (first.get(gguf.Keys.General.LICENSE_NAME) if first else None)
    license_link = recipe.license_link if recipe else (first.get(gguf.Keys.General.LICENSE_LINK) if first else None)
    method = recipe.pruning.method if recipe else (first.get(keys.PRUNING_METHOD) if first else None)

    tags = ["gguf", "llama.cpp", "quantized"]
    if first is not None and first.get(gguf.Keys.General.ARCHITECTURE):
        tags.append(str(first.get(gguf.Keys.General.ARCHITECTURE)))
    if method or (first is not None and first.get(keys.SOURCE_BLOCKS) is not None):
        tags += ["pruned", "depth-pruning"]
    if method:
        tags.append(_slug(method))
    tags.append("shortquant")

    meta: dict = {}
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "quantized"
    meta["quantized_by"] = quantized_by
    if license_id:
        meta["license"] = license_id
        if license_id == "other":
            if license_name:
                meta["license_name"] = _slug(license_name)
            if license_link:
                meta["license_link"] = license_link
    else:
        meta["license"] = UNKNOWN_LICENSE
    languages = list(recipe.language) if recipe is not None and recipe.language else _gguf_strings(
        first, gguf.Keys.General.LANGUAGES)
    if languages:
        meta["language"] = languages
    datasets = _gguf_datasets(first)
    if datasets:
        meta["datasets"] = datasets
    meta["tags"] = list(dict.fromkeys(tags))
    meta["pipeline_tag"] = "text-generation"
    return meta


UNKNOWN_LICENSE = "unknown"


def _gguf_strings(model: GGUFFile | None, key: str) -> list[str]:
    value = model.get(key) if model is not None else None
    if isinstance(value, str):
        value = [value]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def _gguf_datasets(model: GGUFFile | None) -> list[str]:
    if model is None:
        return []
    count = model.get(gguf.Keys.General.DATASET_COUNT) or 0
    names = [model.get(gguf.Keys.General.DATASET_NAME.format(id=i)) for i in range(int(count))]
    return [str(n) for n in names if n]


def missing_metadata(meta: dict) -> list[str]:
    """Warnings for front matter the hub needs but nobody could tell us."""
    out = []
    if not meta.get("base_model"):
        out.append("the card has no base_model; if the model was made from another one, pass "
                   "--base-model USER/NAME (or use a source whose README.md names it)")
    if meta.get("license") in (None, UNKNOWN_LICENSE):
        out.append("the card's license is unknown (pass --license ID, e.g. mit or apache-2.0)")
    return out


def card_warnings(readme: str | Path) -> list[str]:
    """``missing_metadata`` of a card on disk (for ``publish``)."""
    from shortquant.source.model_card import read_front_matter

    return missing_metadata(read_front_matter(Path(readme)))


def _front_matter(meta: dict) -> str:
    from huggingface_hub import ModelCardData

    return "---\n" + ModelCardData(**meta).to_yaml() + "\n---\n"


def _render_prompt_example(chat_template: str) -> str | None:
    """The chat template applied to one user turn, as a user would type it."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(chat_template).render(
            messages=[{"role": "user", "content": "{prompt}"}],
            add_generation_prompt=True, bos_token="", eos_token="</s>")
    except Exception:   # an exotic template: the card shows the raw Jinja instead
        return None


def _is_non_commercial(recipe: Recipe | None, meta: dict) -> bool:
    text = " ".join(filter(None, [meta.get("license_name"), recipe.license_name if recipe else None,
                                  recipe.notes if recipe else None])).lower()
    return "non-commercial" in text or "noncommercial" in text


def _what_section(models, recipe, meta) -> list[str]:
    first = models[0]
    title = first.get(gguf.Keys.General.NAME) or (recipe.name if recipe else first.name)
    lines = [f"# {title} — GGUF", ""]
    source_blocks = first.get(keys.SOURCE_BLOCKS)
    source_count = first.get(keys.SOURCE_BLOCK_COUNT)
    if recipe is not None:
        pruned = _hub_link(recipe.hub_id) if recipe.hub_id else f"`{recipe.name}`"
        base = _hub_link(recipe.base_model) if recipe.base_model else "a model trained from scratch"
        described = f" ({recipe.base_model_description})" if recipe.base_model_description else ""
        lines.append(f"GGUF files of {pruned}, a depth-pruned model made from {base}{described}, "
                     f"converted and quantized with shortquant for llama.cpp and compatible runtimes.")
        method = recipe.pruning.method
        removed = list(recipe.removed_blocks)
        count = recipe.pruning.source_block_count
        if source_blocks is not None and list(source_blocks) != list(recipe.kept_blocks):
            # more blocks removed than the release did (export --remove-blocks, prune): the file says which
            method = first.get(keys.PRUNING_METHOD) or method
            removed = sorted(set(range(count)) - {int(i) for i in source_blocks})
    else:
        lines.append("GGUF files converted and quantized with shortquant for llama.cpp and compatible runtimes.")
        method = first.get(keys.PRUNING_METHOD)
        count = int(source_count) if source_count is not None else None
        removed = (sorted(set(range(count)) - {int(i) for i in source_blocks})
                   if source_blocks is not None and count is not None else [])
    lines.append("")
    if removed and count:
        kept = count - len(removed)
        lines += ["## Pruning", "",
                  f"- Method: {method or 'block (depth) pruning'}",
                  f"- Blocks: {kept} of the original {count} Transformer blocks are kept.",
                  f"- Removed blocks (0-based indices in the original model): {_ranges(removed)}",
                  f"- Kept blocks: {_ranges(sorted(set(range(count)) - set(removed)))}, "
                  f"which become `blk.0`-`blk.{kept - 1}`; every file records the original index of "
                  f"each block in `{keys.SOURCE_BLOCKS}`."]
        if recipe is not None and recipe.pruning.ratio:
            lines.append(f"- Pruning ratio (as published): {recipe.pruning.ratio:.0%}")
        if recipe is not None and recipe.source:
            lines.append(f"- Source of the removed-block list: <{recipe.source}>")
        lines.append("")
    from shortquant.families.deci import block_summary

    lines += block_summary(first.metadata)
    if meta.get("license"):
        lines += ["## License", ""]
        if meta["license"] == "other":
            link = meta.get("license_link")
            name = (recipe.license_name if recipe else None) or meta.get("license_name") or "custom license"
            lines.append(f"License: [{name}]({link})." if link else f"License: {name}.")
        else:
            lines.append(f"License: `{meta['license']}`.")
        if _is_non_commercial(recipe, meta):
            lines += ["", "**Non-commercial use only.** The pruned model and its base model may be used "
                      "for research and non-commercial purposes only; these quantized files carry the "
                      "same restrictions."]
        lines.append("")
    if recipe is not None and recipe.notes:
        lines += ["## Notes", "", recipe.notes, ""]
    if recipe is not None and recipe.evaluation:
        lines += ["## Published evaluation of the unquantized model", "",
                  "| Metric | Dataset | Value | Source |", "| --- | --- | --- | --- |"]
        lines += [f"| {e.metric} | {e.dataset} | {e.value:g} | {e.source} |" for e in recipe.evaluation]
        lines.append("")
    return lines


def _files_section(models, measured, recommended, results) -> list[str]:
    has_ppl = any(e.get("ppl") is not None for e in measured.values())
    has_kld = any(e.get("kld") for e in measured.values())
    header = ["File", "Type", "Size", "Bits/weight"]
    if has_ppl:
        header.append("PPL")
    if has_kld:
        header += ["KLD", "Same top-1"]
    header.append("Use")
    lines = ["## Files", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    dominated = _dominated_by(models, measured)
    for model in models:
        entry = measured.get(model.name, {})
        shown = model.name if not model.is_split else f"{model.name} (+{len(model.parts) - 1} parts)"
        row = [f"[{shown}](./{model.name})", model.type, format_size(model.bytes), f"{model.bpw:.2f}"]
        if has_ppl:
            row.append(f"{entry['ppl']:.4f} ± {entry.get('ppl_err') or 0:.4f}"
                       if entry.get("ppl") is not None else "-")
        if has_kld:
            kld = entry.get("kld")
            # a file against itself can measure a hair below zero from rounding: show 0
            row += [f"{max(kld['mean'], 0.0):.4f}", f"{100 * kld['same_top1']:.1f} %"] if kld else ["-", "-"]
        note = type_note(model.type) + _versus_base_mix(model, models, measured)
        if model.name in dominated:
            note += f"; here {dominated[model.name].type} is no larger and at least as close to the reference"
        if model.name == recommended:
            note = f"**recommended**; {note}"
        row.append(note)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", _recommendation(models, measured)[1], ""]
    if results:
        settings = results.get("settings") or {}
        hardware = results.get("hardware") or {}
        text = (settings.get("text") or {}) if isinstance(settings.get("text"), dict) else {}
        facts = []
        if settings.get("ctx"):
            facts.append(f"context {settings['ctx']}")
        if settings.get("chunks"):
            facts.append(f"{settings['chunks']} chunks")
        if text.get("path"):
            facts.append(f"text `{Path(str(text['path'])).name}`")
        if settings.get("base"):
            facts.append(f"KLD against `{Path(str(settings['base'])).name}`")
        lines.append("PPL: perplexity with llama.cpp's algorithm; KLD: mean KL divergence of the "
                     "token distributions from the reference; same top-1: how often the most likely "
                     "token matches the reference" + (f" ({', '.join(facts)})." if facts else "."))
        if hardware.get("cpu") or hardware.get("gpu"):
            lines.append(f"Measured on {hardware.get('gpu') or hardware.get('cpu')}"
                         + (f" with llama-cpp-python {hardware['llama_cpp_version']}."
                            if hardware.get("llama_cpp_version") else "."))
        lines.append("")
    if any(m.is_split for m in models):
        lines += ["### Split files", "",
                  "Files marked \"+N parts\" are split in llama.cpp's format "
                  "(`-00001-of-0000N.gguf`). llama.cpp and llama-cpp-python load them directly: "
                  "download every part into one folder and point them at the first part. "
                  "ollama and other runtimes that read a single GGUF cannot load split files; merge "
                  "them first with `llama-gguf-split --merge <first part> merged.gguf`.", ""]
    return lines


def _prompt_section(models) -> list[str]:
    template = models[0].get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    lines = ["## Prompt template", ""]
    if not template:
        lines += ["None: this is a base (non-chat) model. Give it plain text to continue.", ""]
        return lines
    example = _render_prompt_example(str(template))
    family = template_family(str(template))
    if family:
        lines.append(f"The files carry the {family} chat template in `tokenizer.chat_template`; "
                     "chat front ends apply it for you. One user turn looks like this:")
    else:
        lines.append("The files carry a chat template in `tokenizer.chat_template`; "
                     "chat front ends apply it for you.")
    lines.append("")
    if example is not None:
        lines += ["```text", example, "```", ""]
    else:
        lines += ["```jinja", str(template), "```", ""]
    return lines


def _run_section(models, recommended, repo: str | None) -> list[str]:
    pick = next((m for m in models if m.name == recommended), models[-1])
    repo_id = repo or "<user>/<repo>"
    chat = bool(pick.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE))
    lines = ["## How to run", "", "### llama.cpp", "", "```sh"]
    if chat:
        lines.append(f"llama-cli -m {pick.name} -cnv          # chat, using the built-in template")
    else:
        lines.append(f"llama-cli -m {pick.name} -p \"Once upon a time\" -n 128")
    lines += [f"llama-server -m {pick.name} --port 8080", "```", "",
              "### llama-cpp-python", "", "```python", "from llama_cpp import Llama", ""]
    extra = ""
    if pick.is_split:
        extra = ", additional_files=[" + ", ".join(f'"{p.name}"' for p in pick.parts[1:]) + "]"
    lines.append(f'llm = Llama.from_pretrained(repo_id="{repo_id}", filename="{pick.name}"{extra})')
    lines.append(f'# or, from a local file: llm = Llama(model_path="{pick.name}")')
    if chat:
        lines.append('out = llm.create_chat_completion(messages=[{"role": "user", "content": "Hello!"}])')
        lines.append('print(out["choices"][0]["message"]["content"])')
    else:
        lines.append('print(llm("Once upon a time", max_tokens=64)["choices"][0]["text"])')
    lines += ["```", "", "### ollama", ""]
    if pick.is_split:
        lines += ["ollama cannot load split files; merge them first (see above).", ""]
    lines += ["```sh", f"ollama run hf.co/{repo_id}:{pick.type}",
              f"# or, from a local download: ollama create my-model -f {modelfile_name(pick.name)}",
              "```", ""]
    return lines


def _checksum_section(models, progress: bool) -> list[str]:
    from tqdm import tqdm

    paths = [p for m in models for p in m.parts]
    lines = ["## Checksums", "", "| File | Bytes | SHA-256 |", "| --- | --- | --- |"]
    with tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True,
              desc="sha256", disable=not progress) as bar:
        for path in paths:
            lines.append(f"| {path.name} | {path.stat().st_size} | `{sha256_file(path, bar)}` |")
    lines.append("")
    return lines


def write_card(outdir: str | Path, recipe: Recipe | str | None = None, results: dict | str | Path | None = None,
               quantized_by: str = DEFAULT_QUANTIZED_BY, plot: str | Path | None = None, *,
               repo: str | None = None, progress: bool = True, base_model: str | None = None,
               license: str | None = None) -> Path:
    """Write ``outdir/README.md`` for the GGUF files in ``outdir`` and return its path.

    ``recipe`` is a :class:`Recipe` or a name/hub id (default: the ``shortquant.recipe`` the
    files record); ``results`` a results.json path or its decoded dict (default:
    ``outdir/results.json`` when present); ``plot`` an image to show (copied into ``outdir``);
    ``repo`` the hub repo the card will live in, for the run snippets; ``base_model`` and
    ``license`` override what the recipe and the files say.

        >>> write_card("out/st-vicuna", recipe="st-vicuna-v1.3-5.5b-taylor", repo="me/st-vicuna-GGUF")  # doctest: +SKIP
    """
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise PublishError("not a folder", outdir)
    models = find_models(outdir)
    if not models:
        raise PublishError("no .gguf files to describe", outdir)
    recipe = _resolve_recipe(recipe, models)
    results = _resolve_results(results, outdir)
    measured = _results_by_file(results, models)
    recommended = _recommended(models, measured)
    meta = card_metadata(models, recipe, quantized_by, base_model=base_model, license=license)

    body = _what_section(models, recipe, meta)
    body += _files_section(models, measured, recommended, results)
    if plot is not None:
        plot = Path(plot)
        if not plot.is_file():
            raise PublishError("plot image not found", plot)
        if plot.resolve().parent != outdir.resolve():
            shutil.copy2(plot, outdir / plot.name)
        body += ["## Size and quality", "", f"![size vs quality](./{plot.name})", ""]
    body += _prompt_section(models)
    body += _run_section(models, recommended, repo)
    body += _checksum_section(models, progress)
    body += ["---", "", "Card written by shortquant from the files' own metadata; the measured numbers "
             "come from these exact files.", ""]

    text = _front_matter(meta) + "\n" + "\n".join(body)
    target = outdir / "README.md"
    return write_atomic(target, text)
