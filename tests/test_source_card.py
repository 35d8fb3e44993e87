"""Cards for any source: base_model, license, language, datasets from the source's own README front
matter (or --base-model / --license), recorded in the GGUF and on the card; warnings when missing."""

from __future__ import annotations

import json

import gguf
import pytest
from click.testing import CliRunner

from reliability_helpers import write_llama_checkpoint
from shortquant.cli import main
from shortquant.source.model_card import hub_id_from_cache_path, read_front_matter, read_source_card

SOURCE_README = """---
license: apache-2.0
base_model: someone/tiny-llama-base
language:
- en
- fr
datasets:
- roneneldan/TinyStories
pipeline_tag: text-generation
---
# A tiny pruned llama
"""


@pytest.fixture()
def src_with_card(tmp_path, small_tokenizer):
    return write_llama_checkpoint(tmp_path / "tiny-pruned", small_tokenizer[0], hidden=128, intermediate=256,
                                  layers=2, heads=4, vocab=small_tokenizer[1], readme=SOURCE_README)


@pytest.fixture()
def src_bare(tmp_path, small_tokenizer):
    return write_llama_checkpoint(tmp_path / "no-card", small_tokenizer[0], hidden=128, intermediate=256,
                                  layers=2, heads=4, vocab=small_tokenizer[1])


def gguf_fields(path):
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def test_read_source_card(tmp_path, src_with_card):
    card = read_source_card(src_with_card)
    assert (card.base_model, card.license, card.language, card.datasets, card.pipeline_tag) == (
        "someone/tiny-llama-base", "apache-2.0", ("en", "fr"), ("roneneldan/TinyStories",), "text-generation")
    assert card.origin == {"base_model": "README.md", "license": "README.md"}
    # Options win; a hub snapshot folder names the model itself.
    assert read_source_card(src_with_card, base_model="me/other", license="mit").base_model == "me/other"
    snapshot = tmp_path / "hub" / "models--nota-ai--st-vicuna" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_id_from_cache_path(snapshot) == "nota-ai/st-vicuna"
    assert read_source_card(snapshot).base_model == "nota-ai/st-vicuna"
    # A broken front matter is ignored, not fatal; wrong kinds of values are dropped one by one.
    (snapshot / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert read_front_matter(snapshot / "README.md") == {}
    (snapshot / "README.md").write_text("---\nlicense: {a: 1}\nlanguage: 7\nbase_model: not a hub id\n---\n")
    card = read_source_card(snapshot)
    assert (card.license, card.language, card.base_model) == (None, (), "nota-ai/st-vicuna")


def test_card_front_matter_comes_from_the_source_readme(tmp_path, src_with_card):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(src_with_card), "--out", str(out), "-q", "q8_0", "--card",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    fields = gguf_fields(next(out.glob("*.gguf")))
    assert fields["general.license"] == "apache-2.0"
    assert fields["general.base_model.count"] == 1
    assert fields["general.base_model.0.organization"] == "someone"
    assert fields["general.base_model.0.name"] == "tiny-llama-base"
    assert fields["general.base_model.0.repo_url"] == "https://huggingface.co/someone/tiny-llama-base"
    assert fields["general.languages"] == ["en", "fr"]
    assert fields["general.dataset.0.name"] == "roneneldan/TinyStories"

    from huggingface_hub import ModelCard

    card = ModelCard((out / "README.md").read_text()).data.to_dict()
    assert card["base_model"] == "someone/tiny-llama-base"
    assert card["license"] == "apache-2.0"
    assert card["language"] == ["en", "fr"]
    assert card["datasets"] == ["roneneldan/TinyStories"]
    assert card["pipeline_tag"] == "text-generation"


def test_no_source_card_is_marked_unknown_and_warned_about(tmp_path, src_bare):
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(main, ["export", str(src_bare), "--out", str(out), "-q", "q8_0", "--quiet"]).exit_code == 0
    result = runner.invoke(main, ["card", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and "base_model" in warnings[0] and "license" in warnings[1]
    from huggingface_hub import ModelCard

    text = (out / "README.md").read_text()
    assert text.startswith("---\n")        # front matter present: the hub shows no "missing metadata"
    data = ModelCard(text).data.to_dict()
    assert data["license"] == "unknown" and "base_model" not in data
    staged = runner.invoke(main, ["publish", str(out), "--repo", "me/m-GGUF", "--dry-run", "--quiet",
                                  "--staging-dir", str(tmp_path / "staged")])
    assert staged.exit_code == 0 and staged.stderr.count("warning: ") == 2

    # Given on the command line (export or card), they reach the GGUF and the card; no warnings.
    out2 = tmp_path / "out2"
    result = runner.invoke(main, ["export", str(src_bare), "--out", str(out2), "-q", "q8_0", "--quiet", "--card",
                                  "--base-model", "me/base", "--license", "mit"])
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output
    fields = gguf_fields(next(out2.glob("*.gguf")))
    assert (fields["general.license"], fields["general.base_model.0.repo_url"]) == (
        "mit", "https://huggingface.co/me/base")
    data = ModelCard((out2 / "README.md").read_text()).data.to_dict()
    assert (data["license"], data["base_model"]) == ("mit", "me/base")
    result = runner.invoke(main, ["card", str(out), "--quiet", "--base-model", "x/y", "--license", "cc-by-4.0"])
    assert result.exit_code == 0 and "warning" not in result.stderr
    assert json.dumps(ModelCard((out / "README.md").read_text()).data.to_dict()["license"]) == '"cc-by-4.0"'
