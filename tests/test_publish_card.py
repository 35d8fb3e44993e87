"""Model card: front matter the hub parses, a file table that matches the files, sha256 sums."""

from __future__ import annotations

import hashlib
import re

import gguf
import pytest
import yaml
from huggingface_hub import ModelCard

from publish_helpers import make_gguf, make_results
from shortquant.chat_templates import VICUNA_SYSTEM_PROMPT, chat_template
from shortquant.errors import PublishError
from shortquant.gguf_info import find_models
from shortquant.publish.card import card_metadata, write_card
from shortquant.publish.split import split_gguf
from shortquant.recipes import list_recipes, load_recipe

RECIPE = "st-vicuna-v1.3-5.5b-taylor"
KEPT = list(range(24)) + [30, 31]
PREFIX = "St-Vicuna-v1.3-5.5B-Taylor"


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "gguf"
    out.mkdir()
    for seed, kind in enumerate(("F16", "Q8_0", "Q4_0")):
        make_gguf(out / f"{PREFIX}-{kind}.gguf", kind, chat_template=chat_template("vicuna"),
                  source_blocks=KEPT, source_block_count=32, recipe=RECIPE, seed=seed)
    return out


def _table(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def test_card_front_matter_parses_with_every_key(folder):
    readme = write_card(folder, quantized_by="tester", progress=False)   # recipe from the files
    card = ModelCard.load(readme)
    data = card.data.to_dict()
    assert data["base_model"] == "nota-ai/st-vicuna-v1.3-5.5b-taylor"
    assert data["base_model_relation"] == "quantized"
    assert data["quantized_by"] == "tester"
    assert data["license"] == "other"
    assert data["license_name"] == "shortened-llm-non-commercial"
    assert data["license_link"].startswith("https://github.com/Nota-NetsPresso/shortened-llm")
    assert data["language"] == ["en"]
    assert data["pipeline_tag"] == "text-generation"
    assert {"gguf", "pruned", "depth-pruning", "shortened-llama-taylor"} <= set(data["tags"])
    assert "Non-commercial use only" in card.text
    assert "Removed blocks (0-based indices in the original model): 24-29" in card.text
    assert "0-23, 30-31" in card.text


def test_file_table_and_checksums_match_the_files(folder):
    make_results(folder, {
        f"{PREFIX}-Q8_0.gguf": {"type": "Q8_0", "ppl": 7.1234, "ppl_err": 0.05,
                                "kld": {"mean": 0.0012, "err": 0.0001, "same_top1": 0.985}},
        f"{PREFIX}-Q4_0.gguf": {"type": "Q4_0", "ppl": 7.9, "ppl_err": 0.06,
                                "kld": {"mean": 0.08, "err": 0.002, "same_top1": 0.88}},
    })
    text = write_card(folder, recipe=RECIPE, repo="me/st-GGUF", progress=False).read_text()

    rows = _table(text, "Files")
    names = [re.match(r"\[(.+?)\]", row[0]).group(1) for row in rows]
    assert sorted(names) == sorted(p.name for p in folder.glob("*.gguf"))
    by_name = dict(zip(names, rows))
    reader = gguf.GGUFReader(folder / f"{PREFIX}-Q8_0.gguf")
    params = sum(int(t.n_elements) for t in reader.tensors)
    data_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    q8 = by_name[f"{PREFIX}-Q8_0.gguf"]
    assert q8[1] == "Q8_0" and float(q8[3]) == pytest.approx(data_bytes * 8 / params, abs=0.005)
    assert q8[4] == "7.1234 ± 0.0500" and q8[5] == "0.0012" and q8[6] == "98.5 %"
    assert "**recommended**" in q8[-1]             # Q4_0 agrees less than 90 % on top-1
    assert by_name[f"{PREFIX}-F16.gguf"][4] == "-"  # not measured

    sums = _table(text, "Checksums")
    assert len(sums) == 3
    for name, size, digest in sums:
        path = folder / name
        assert int(size) == path.stat().st_size
        assert digest.strip("`") == hashlib.sha256(path.read_bytes()).hexdigest()

    assert f'repo_id="me/st-GGUF", filename="{PREFIX}-Q8_0.gguf"' in text
    assert f"ollama run hf.co/me/st-GGUF:Q8_0" in text
    assert f"{VICUNA_SYSTEM_PROMPT} USER: {{prompt}} ASSISTANT:" in text


def test_split_set_is_one_row_with_every_part_checksummed(folder):
    parts = split_gguf(folder / f"{PREFIX}-F16.gguf", "100K", progress=False)
    (folder / f"{PREFIX}-F16.gguf").unlink()
    assert len(parts) == 3
    text = write_card(folder, progress=False).read_text()
    rows = _table(text, "Files")
    assert len(rows) == 3 and any(f"{parts[0].name} (+2 parts)" in row[0] for row in rows)
    assert {row[0] for row in _table(text, "Checksums")} >= {p.name for p in parts}
    assert "cannot load split files" in text
    split_model = next(m for m in find_models(folder) if m.is_split)
    assert split_model.type == "F16" and split_model.bytes == sum(p.stat().st_size for p in parts)


def test_card_without_recipe_uses_gguf_metadata(tmp_path):
    extra = {gguf.Keys.General.LICENSE: "apache-2.0",
             gguf.Keys.General.BASE_MODEL_REPO_URL.format(id=0): "https://huggingface.co/me/pruned-7b"}
    make_gguf(tmp_path / "Pruned-5B-Q8_0.gguf", "Q8_0", chat_template=None, extra=extra,
              source_blocks=[0, 2, 3], source_block_count=4)
    card = ModelCard.load(write_card(tmp_path, progress=False))
    assert card.data.base_model == "me/pruned-7b"
    assert card.data.license == "apache-2.0" and not card.data.get("license_name")
    assert "Removed blocks (0-based indices in the original model): 1" in card.text
    assert "base (non-chat) model" in card.text


@pytest.mark.parametrize("recipe", [r for r in list_recipes() if r.name.startswith("st-")], ids=lambda r: r.name)
def test_every_release_recipe_gives_hub_metadata(folder, recipe):
    meta = card_metadata(find_models(folder), recipe, "tester")
    card = ModelCard("---\n" + yaml.safe_dump(meta) + "---\n\nbody\n")
    assert card.data.base_model == recipe.hub_id
    assert card.data.license == "other" and card.data.license_link == recipe.license_link
    assert "gguf" in card.data.tags and card.data.pipeline_tag == "text-generation"


def test_plot_is_copied_and_shown(folder, tmp_path):
    plot = tmp_path / "report.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    text = write_card(folder, plot=plot, progress=False).read_text()
    assert (folder / "report.png").read_bytes() == plot.read_bytes()
    assert "![size vs quality](./report.png)" in text


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(PublishError, match="no .gguf files"):
        write_card(tmp_path, progress=False)
    with pytest.raises(PublishError, match="not a folder"):
        write_card(tmp_path / "missing", progress=False)
    make_gguf(tmp_path / "M-Q8_0.gguf")
    with pytest.raises(PublishError, match="plot image not found"):
        write_card(tmp_path, plot=tmp_path / "nope.png", progress=False)
    with pytest.raises(Exception, match="unknown recipe"):
        write_card(tmp_path, recipe="nope", progress=False)
    assert load_recipe(RECIPE).hub_id   # sanity: the known one still resolves
