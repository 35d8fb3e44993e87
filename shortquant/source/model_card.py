"""What a source checkpoint says about itself for the hub: base model, license, languages, data.

Read from the YAML front matter of the checkpoint's own ``README.md`` (the hub's model card),
from ``config.json``'s ``_name_or_path`` when that is a hub id, and from the hub cache path
when the checkpoint was downloaded (``models--org--name/snapshots/<sha>`` is ``org/name``).
``--base-model`` and ``--license`` override. The result goes into every GGUF
(``general.license``, ``general.base_model.*``, ``general.languages``, ``general.dataset.*``)
so the card, written later from the files alone, can carry it.

A front matter that is not valid YAML, or values of the wrong kind, are ignored value by
value: a README is documentation, not an input the export depends on.

    >>> card = read_source_card(Path("st-vicuna-v1.3-5.5b-taylor"))   # doctest: +SKIP
    >>> card.license, card.base_model                                   # doctest: +SKIP
    ('other', 'nota-ai/st-vicuna-v1.3-5.5b-taylor')
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..hub import HUB, is_hub_id

_SLUG = re.compile(r"^[A-Za-z0-9][\w.+-]*$")
_CACHE_DIR = re.compile(r"^models--([^/]+?)--([^/]+)$")
_MAX_README = 1024 * 1024


@dataclass(frozen=True)
class SourceCard:
    base_model: str | None = None          # the hub id the GGUF files are quantized from (or its base)
    license: str | None = None             # hub license id: mit, apache-2.0, llama2, other, ...
    license_name: str | None = None
    license_link: str | None = None
    language: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    origin: dict[str, str] = field(default_factory=dict)   # value name -> where it came from


def hub_id_from_cache_path(folder: Path) -> str | None:
    """``org/name`` for a huggingface_hub snapshot folder, else None."""
    parts = Path(folder).resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots":
        match = _CACHE_DIR.match(parts[-3])
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def read_front_matter(readme: Path) -> dict:
    """The YAML front matter of a model card as a dict; {} when absent or unreadable."""
    import yaml

    try:
        with open(readme, encoding="utf-8") as fh:
            text = fh.read(_MAX_README)
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _strings(value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    return tuple(v.strip() for v in value if isinstance(v, str) and v.strip())


def read_source_card(folder: Path, base_model: str | None = None, license: str | None = None) -> SourceCard:
    """The hub metadata of the checkpoint in ``folder``; ``base_model``/``license`` override."""
    folder = Path(folder)
    front = read_front_matter(folder / "README.md")
    origin: dict[str, str] = {}

    chosen_base = None
    candidates = [(base_model, "--base-model"), (hub_id_from_cache_path(folder), "the hub id it was downloaded as")]
    candidates += [(b, "README.md") for b in _strings(front.get("base_model"))[:1]]
    candidates.append((_config_name(folder), "config.json _name_or_path"))
    for value, where in candidates:
        if is_hub_id(value):
            chosen_base, origin["base_model"] = value, where
            break

    chosen_license = license if license else None
    if chosen_license:
        origin["license"] = "--license"
    else:
        value = front.get("license")
        if isinstance(value, str) and _SLUG.match(value.strip()):
            chosen_license, origin["license"] = value.strip(), "README.md"
    license_name = front.get("license_name") if chosen_license == "other" and not license else None
    license_link = front.get("license_link") if chosen_license == "other" and not license else None
    pipeline = front.get("pipeline_tag")
    return SourceCard(
        base_model=chosen_base,
        license=chosen_license,
        license_name=license_name if isinstance(license_name, str) else None,
        license_link=license_link if isinstance(license_link, str) else None,
        language=_strings(front.get("language")),
        datasets=tuple(d for d in _strings(front.get("datasets")) if _SLUG.match(d.replace("/", "-"))),
        pipeline_tag=pipeline if isinstance(pipeline, str) and _SLUG.match(pipeline) else None,
        origin=origin,
    )


def _config_name(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    # A local path written by save_pretrained is not a hub id; a hub id has exactly one slash.
    return name if is_hub_id(name) and not Path(name).exists() else None


def metadata_items(card: SourceCard, present: set[str]):
    """GGUF metadata for ``card``, leaving out keys already in ``present`` (a recipe's say wins)."""
    import gguf
    from gguf import GGUFValueType

    from ..plan import MetaItem

    G, S, U = gguf.Keys.General, GGUFValueType.STRING, GGUFValueType.UINT32
    items = []
    if card.license and G.LICENSE not in present:
        items.append(MetaItem(G.LICENSE, card.license, S))
        if card.license_name:
            items.append(MetaItem(G.LICENSE_NAME, card.license_name, S))
        if card.license_link:
            items.append(MetaItem(G.LICENSE_LINK, card.license_link, S))
    if card.base_model and G.BASE_MODEL_COUNT not in present:
        org, _, name = card.base_model.rpartition("/")
        items += [MetaItem(G.BASE_MODEL_COUNT, 1, U),
                  MetaItem(G.BASE_MODEL_NAME.format(id=0), name, S),
                  MetaItem(G.BASE_MODEL_ORGANIZATION.format(id=0), org, S),
                  MetaItem(G.BASE_MODEL_REPO_URL.format(id=0), f"{HUB}/{card.base_model}", S)]
    if card.language and G.LANGUAGES not in present:
        items.append(MetaItem(G.LANGUAGES, list(card.language), GGUFValueType.ARRAY, S))
    if card.datasets and G.DATASET_COUNT not in present:
        items.append(MetaItem(G.DATASET_COUNT, len(card.datasets), U))
        for i, dataset in enumerate(card.datasets):
            items.append(MetaItem(G.DATASET_NAME.format(id=i), dataset, S))
            if is_hub_id(dataset):
                items.append(MetaItem(G.DATASET_REPO_URL.format(id=i), f"{HUB}/datasets/{dataset}", S))
    return items
