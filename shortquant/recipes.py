"""Recipes: what a known pruned release does not say about itself.

A pruned checkpoint on the hub carries its weights and a config, but not which blocks of the
original model were removed, what it was pruned from, under which license it may be used or
which chat template it speaks. A recipe is a small JSON file in ``models/recipes/`` holding
exactly that, one file per release, so ``export`` can write correct provenance into the GGUF
and ``card`` can write a correct model card.

    >>> from shortquant.recipes import load_recipe
    >>> r = load_recipe("nota-ai/st-vicuna-v1.3-5.5b-taylor")
    >>> r.pruning.removed_blocks
    (24, 25, 26, 27, 28, 29)
    >>> len(r.kept_blocks)
    26
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shortquant.errors import SourceError
from shortquant.resources import recipes_dir
from shortquant.suggest import unknown_name

RECIPES_DIR = recipes_dir()

# Keys of a recipe file: required ones must be present (null allowed where the schema says so).
_REQUIRED = ("name", "hub_id", "basename", "base_model", "pruning", "license")
_OPTIONAL = ("finetune", "version", "base_model_description", "license_name", "license_link",
             "chat_template", "language", "evaluation", "source", "notes")
_PRUNING_REQUIRED = ("method", "unit", "source_block_count", "removed_blocks")
_PRUNING_OPTIONAL = ("ratio", "criterion")
_EVALUATION_REQUIRED = ("metric", "value", "dataset", "source")


class RecipeError(SourceError):
    """A recipe is unknown, not valid JSON, or describes an impossible pruning."""


@dataclass(frozen=True)
class Pruning:
    """How the release was pruned from its base model (block indices are 0-based, original)."""

    method: str
    unit: str
    source_block_count: int
    removed_blocks: tuple[int, ...]
    ratio: float | None = None
    criterion: str | None = None


@dataclass(frozen=True)
class Evaluation:
    """One published number, with where it was published."""

    metric: str
    value: float
    dataset: str
    source: str


@dataclass(frozen=True)
class Recipe:
    """A known pruned release. Load with :func:`load_recipe`."""

    name: str
    hub_id: str | None
    basename: str
    base_model: str | None   # None for a model trained from scratch (the demo)
    pruning: Pruning
    license: str
    finetune: str | None = None
    version: str | None = None
    base_model_description: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    chat_template: str | None = None
    language: tuple[str, ...] = ()
    evaluation: tuple[Evaluation, ...] = ()
    source: str | None = None
    notes: str | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def removed_blocks(self) -> tuple[int, ...]:
        """Original indices of the removed blocks, sorted."""
        return tuple(sorted(self.pruning.removed_blocks))

    @property
    def kept_blocks(self) -> tuple[int, ...]:
        """Original indices of the blocks the release keeps, in order: the source index of blk.N."""
        removed = set(self.pruning.removed_blocks)
        return tuple(i for i in range(self.pruning.source_block_count) if i not in removed)

    @property
    def block_count(self) -> int:
        """Number of blocks in the pruned model."""
        return len(self.kept_blocks)


def _fail(path: Path, problem: str) -> RecipeError:
    return RecipeError(problem, path)


def _check_keys(data: dict, required: tuple, optional: tuple, where: str, path: Path) -> None:
    missing = [k for k in required if k not in data]
    if missing:
        raise _fail(path, f"{where} lacks {', '.join(missing)}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise _fail(path, f"{where} has unknown key(s) {', '.join(unknown)}")


def _string(data: dict, key: str, path: Path, *, nullable: bool) -> str | None:
    value = data.get(key)
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(path, f"'{key}' must be a non-empty string{' or null' if nullable else ''}")
    return value


def _parse_pruning(data, path: Path) -> Pruning:
    if not isinstance(data, dict):
        raise _fail(path, "'pruning' must be an object")
    _check_keys(data, _PRUNING_REQUIRED, _PRUNING_OPTIONAL, "'pruning'", path)
    count = data["source_block_count"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise _fail(path, "'pruning.source_block_count' must be a positive integer")
    removed = data["removed_blocks"]
    if not isinstance(removed, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in removed):
        raise _fail(path, "'pruning.removed_blocks' must be a list of integers")
    if len(set(removed)) != len(removed):
        dupes = sorted({i for i in removed if removed.count(i) > 1})
        raise _fail(path, f"'pruning.removed_blocks' repeats {dupes}")
    out_of_range = [i for i in removed if not 0 <= i < count]
    if out_of_range:
        raise _fail(path, f"'pruning.removed_blocks' {out_of_range} outside 0..{count - 1}")
    if len(removed) >= count:
        raise _fail(path, "'pruning.removed_blocks' removes every block")
    ratio = data.get("ratio")
    if ratio is not None and (not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
        raise _fail(path, "'pruning.ratio' must be a number between 0 and 1")
    return Pruning(
        method=_string(data, "method", path, nullable=False),
        unit=_string(data, "unit", path, nullable=False),
        source_block_count=count,
        removed_blocks=tuple(removed),
        ratio=float(ratio) if ratio is not None else None,
        criterion=_string(data, "criterion", path, nullable=True),
    )


def _parse_evaluation(items, path: Path) -> tuple[Evaluation, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise _fail(path, "'evaluation' must be a list")
    out = []
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise _fail(path, f"'evaluation[{n}]' must be an object")
        _check_keys(item, _EVALUATION_REQUIRED, (), f"'evaluation[{n}]'", path)
        if not isinstance(item["value"], (int, float)) or isinstance(item["value"], bool):
            raise _fail(path, f"'evaluation[{n}].value' must be a number")
        out.append(Evaluation(metric=str(item["metric"]), value=float(item["value"]),
                              dataset=str(item["dataset"]), source=str(item["source"])))
    return tuple(out)


def parse_recipe(data, path: Path) -> Recipe:
    """Validate the decoded JSON of a recipe file and build the :class:`Recipe`.

    >>> parse_recipe({"name": "x", "hub_id": None, "basename": "X", "base_model": "a/b",
    ...               "license": "mit", "pruning": {"method": "m", "unit": "block",
    ...               "source_block_count": 4, "removed_blocks": [2]}}, Path("x.json")).kept_blocks
    (0, 1, 3)
    """
    if not isinstance(data, dict):
        raise _fail(path, "a recipe must be a JSON object")
    _check_keys(data, _REQUIRED, _OPTIONAL, "recipe", path)
    language = data.get("language") or []
    if not isinstance(language, list) or not all(isinstance(x, str) for x in language):
        raise _fail(path, "'language' must be a list of strings")
    license_id = _string(data, "license", path, nullable=False)
    if license_id == "other" and not (data.get("license_name") and data.get("license_link")):
        raise _fail(path, "license 'other' needs 'license_name' and 'license_link'")
    return Recipe(
        name=_string(data, "name", path, nullable=False),
        hub_id=_string(data, "hub_id", path, nullable=True),
        basename=_string(data, "basename", path, nullable=False),
        base_model=_string(data, "base_model", path, nullable=True),
        pruning=_parse_pruning(data["pruning"], path),
        license=license_id,
        finetune=_string(data, "finetune", path, nullable=True),
        version=_string(data, "version", path, nullable=True),
        base_model_description=_string(data, "base_model_description", path, nullable=True),
        license_name=_string(data, "license_name", path, nullable=True),
        license_link=_string(data, "license_link", path, nullable=True),
        chat_template=_string(data, "chat_template", path, nullable=True),
        language=tuple(language),
        evaluation=_parse_evaluation(data.get("evaluation"), path),
        source=_string(data, "source", path, nullable=True),
        notes=_string(data, "notes", path, nullable=True),
        path=path,
    )


def read_recipe(path: str | Path) -> Recipe:
    """Read and validate one recipe file.

    >>> read_recipe(RECIPES_DIR / "st-llama-1-5.5b-ppl.json").base_model
    'baffo32/decapoda-research-llama-7B-hf'
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(path, "recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot read recipe: {exc}") from None
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    return parse_recipe(data, path)


def list_recipes(directory: Path | None = None) -> list[Recipe]:
    """Every recipe shipped in ``models/recipes/``, sorted by name.

    >>> [r.name for r in list_recipes() if r.name.startswith("st-llama")]
    ['st-llama-1-5.5b-ppl', 'st-llama-1-5.5b-taylor']
    """
    directory = directory or RECIPES_DIR
    if not directory.is_dir():
        return []
    return sorted((read_recipe(p) for p in directory.glob("*.json")), key=lambda r: r.name)


def load_recipe(name_or_hub_id: str, directory: Path | None = None) -> Recipe:
    """Find a recipe by file name, by its ``name``, by its ``hub_id``, or by a path to a JSON file.

    Hub ids compare case-insensitively (the hub itself does).

    >>> load_recipe("st-vicuna-v1.3-10.5b-ppl").hub_id
    'nota-ai/st-vicuna-v1.3-10.5b-ppl'
    >>> load_recipe("Nota-AI/st-llama-1-5.5b-taylor").name
    'st-llama-1-5.5b-taylor'
    """
    key = name_or_hub_id.strip()
    as_path = Path(key)
    if key.endswith(".json") and as_path.is_file():
        return read_recipe(as_path)
    directory = directory or RECIPES_DIR
    stem = key[:-5] if key.endswith(".json") else key
    by_file = directory / f"{stem}.json"
    if "/" not in stem and by_file.is_file():
        return read_recipe(by_file)
    recipes = list_recipes(directory)
    folded = key.casefold()
    for recipe in recipes:
        if recipe.name == stem or (recipe.hub_id and recipe.hub_id.casefold() == folded):
            return recipe
    raise RecipeError(unknown_name("recipe", key, [r.name for r in recipes] or ["none"], listed="known"))
