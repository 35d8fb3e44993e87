"""Recipes of the known pruned releases: they load, they are self-consistent, bad ones fail clearly."""

from __future__ import annotations

import json

import pytest

from shortquant.errors import ShortquantError, SourceError
from shortquant.recipes import RECIPES_DIR, RecipeError, list_recipes, load_recipe, read_recipe

# name -> (base model, source block count, removed original indices, chat template)
# Removed blocks: first entries of each block_order.csv published in Nota-NetsPresso/shortened-llm
# after block_prune.py's "plus" heuristic (blocks 0-3 and the last two are never removed).
RELEASES = {
    "st-llama-1-5.5b-ppl": ("baffo32/decapoda-research-llama-7B-hf", 32, [10, 13, 24, 25, 26, 27], None),
    "st-llama-1-5.5b-taylor": ("baffo32/decapoda-research-llama-7B-hf", 32, [24, 25, 26, 27, 28, 29], None),
    "st-vicuna-v1.3-5.5b-ppl": ("lmsys/vicuna-7b-v1.3", 32, [10, 11, 20, 24, 25, 27], "vicuna"),
    "st-vicuna-v1.3-5.5b-taylor": ("lmsys/vicuna-7b-v1.3", 32, [24, 25, 26, 27, 28, 29], "vicuna"),
    "st-vicuna-v1.3-10.5b-ppl": ("lmsys/vicuna-13b-v1.3", 40, [12, 20, 24, 26, 32, 34, 35, 36], "vicuna"),
    "st-vicuna-v1.3-10.5b-taylor": ("lmsys/vicuna-13b-v1.3", 40, list(range(30, 38)), "vicuna"),
}
# Blocks in the released checkpoints' config.json (num_hidden_layers): 5.5B -> 26, 10.5B -> 32.
RELEASED_BLOCKS = {"5.5b": 26, "10.5b": 32}


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_recipe(name):
    base, count, removed, template = RELEASES[name]
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.hub_id == f"nota-ai/{name}"
    assert recipe.base_model == base
    assert recipe.pruning.unit == "block"
    assert recipe.pruning.source_block_count == count
    assert list(recipe.removed_blocks) == removed
    assert recipe.chat_template == template
    kept = recipe.kept_blocks
    assert len(kept) == count - len(removed)
    assert len(kept) == RELEASED_BLOCKS[name.split("-")[-2]]
    assert list(kept) == sorted(set(range(count)) - set(removed))
    # Taylor+/PPL+ never remove the first four or the last two blocks.
    assert not set(removed) & {0, 1, 2, 3, count - 2, count - 1}
    # Non-commercial: the hub needs a named license with a link, and the text says so.
    assert recipe.license == "other" and recipe.license_name and recipe.license_link
    assert "non-commercial" in recipe.notes.lower()
    assert recipe.source.startswith("https://github.com/Nota-NetsPresso/shortened-llm/")
    assert recipe.source.endswith("block_order.csv")
    for ev in recipe.evaluation:       # only numbers with a source, if any
        assert ev.source


def test_lookup_by_hub_id_file_name_and_path():
    by_hub = load_recipe("Nota-AI/St-Vicuna-v1.3-10.5B-Taylor")   # hub ids are case-insensitive
    assert by_hub.name == "st-vicuna-v1.3-10.5b-taylor"
    assert load_recipe("st-vicuna-v1.3-10.5b-taylor.json") == by_hub
    assert load_recipe(str(RECIPES_DIR / "st-vicuna-v1.3-10.5b-taylor.json")) == by_hub


def test_list_recipes_contains_all_releases():
    names = {r.name for r in list_recipes()}
    assert set(RELEASES) <= names
    # Every shipped file's name matches the recipe inside it, so lookup by either agrees.
    for recipe in list_recipes():
        assert recipe.path.stem == recipe.name


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(RecipeError) as info:
        load_recipe("nota-ai/st-llama-2-5.5b")
    message = str(info.value)
    assert "unknown recipe" in message and "st-llama-1-5.5b-ppl" in message
    assert isinstance(info.value, SourceError) and isinstance(info.value, ShortquantError)


def _write(tmp_path, **changes):
    data = json.loads((RECIPES_DIR / "st-llama-1-5.5b-ppl.json").read_text())
    pruning = changes.pop("pruning", None)
    if pruning:
        data["pruning"].update(pruning)
    data.update(changes)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, fragment", [
    ({"pruning": {"removed_blocks": [3, 3, 4]}}, "repeats [3]"),
    ({"pruning": {"removed_blocks": [10, 32]}}, "[32] outside 0..31"),
    ({"pruning": {"removed_blocks": [-1]}}, "outside"),
    ({"pruning": {"removed_blocks": ["10"]}}, "list of integers"),
    ({"pruning": {"source_block_count": 0}}, "positive integer"),
    ({"license_link": None}, "license 'other' needs"),
    ({"hub_idd": "typo"}, "unknown key(s) hub_idd"),
    ({"evaluation": [{"metric": "ppl", "value": 1.0}]}, "lacks dataset, source"),
])
def test_invalid_recipe_names_the_file(tmp_path, changes, fragment):
    path = _write(tmp_path, **changes)
    with pytest.raises(RecipeError) as info:
        read_recipe(path)
    assert str(info.value).startswith(f"{path}: ")
    assert fragment in str(info.value)


def test_broken_json_is_one_line_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": ')
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(str(path))
