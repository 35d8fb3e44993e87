"""Replicas of the six Shortened-LLaMA releases, exported with their recipes.

Each replica has its release's configuration and tokenizer layout (a sentencepiece
tokenizer.model, tokenizer_config.json, special_tokens_map.json, the release's block count) but
tiny widths and the demo model's 512-piece tokenizer in place of LLaMA's (not ours to ship).
The exported GGUF must carry the release's provenance, and the card the right front matter.
"""

from __future__ import annotations

import json

import gguf
import pytest
from click.testing import CliRunner

from checkpoints import TinySpec, build_model, save_model
from shortquant import keys
from shortquant.cli import main
from shortquant.recipes import list_recipes

RECIPES = [r for r in list_recipes() if r.name.startswith("st-")]


def value(reader, key):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def make_replica(folder, recipe, tokenizer):
    tokenizer_model, vocab_size = tokenizer
    model = build_model(TinySpec(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                 num_key_value_heads=4, num_hidden_layers=recipe.block_count, vocab_size=vocab_size,
                                 rms_norm_eps=1e-6, max_position_embeddings=2048))
    save_model(model, folder, tokenizer_model=tokenizer_model)
    config = json.loads((folder / "config.json").read_text())
    config.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "pad_token_id": 0,
                   "torch_dtype": "float16", "_name_or_path": recipe.base_model})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "legacy": False, "model_max_length": 2048, "pad_token": None, "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", **special}))
    return folder


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_replica_export_carries_provenance_and_card(tmp_path, small_tokenizer, recipe):
    from huggingface_hub import ModelCard

    src = make_replica(tmp_path / recipe.name, recipe, small_tokenizer)   # folder named as the release
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(src), "--quant", "q8_0", "--out", str(out), "--quiet",
                                       "--card"])
    assert result.exit_code == 0, result.output
    assert f"using recipe {recipe.name}" in result.stderr

    path = next(out.glob("*.gguf"))
    assert path.name.startswith(f"{recipe.basename}-") and path.name.endswith(f"-{recipe.finetune}-Q8_0.gguf")
    reader = gguf.GGUFReader(path)
    assert value(reader, keys.SOURCE_BLOCKS) == list(recipe.kept_blocks)
    assert value(reader, keys.SOURCE_BLOCK_COUNT) == recipe.pruning.source_block_count
    assert value(reader, keys.RECIPE) == recipe.name
    assert value(reader, gguf.Keys.General.LICENSE) == recipe.license
    assert value(reader, gguf.Keys.General.BASE_MODEL_NAME.format(id=0)) == recipe.base_model.split("/")[1]
    assert value(reader, "llama.block_count") == recipe.block_count
    has_template = reader.get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE) is not None
    assert has_template == (recipe.chat_template == "vicuna")

    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model_relation"] == "quantized"
    assert data["license"] == recipe.license and data["license_name"] == recipe.license_name
    assert "gguf" in data["tags"] and data["pipeline_tag"] == "text-generation"
    assert path.name in card.text
    assert "non-commercial" in card.text.lower()


def test_explicit_recipe_on_any_folder_name(tmp_path, small_tokenizer):
    recipe = next(r for r in RECIPES if r.name == "st-vicuna-v1.3-5.5b-taylor")
    src = make_replica(tmp_path / "local-copy", recipe, small_tokenizer)
    result = CliRunner().invoke(main, ["inspect", str(src), "--recipe", recipe.name])
    assert result.exit_code == 0, result.output
    assert "removed original blocks: [24, 25, 26, 27, 28, 29]" in result.output
    assert "blk.24  <- source block 24, original block 30" in result.output


def test_recipe_with_wrong_block_count_is_refused(tmp_path, small_tokenizer):
    recipe = next(r for r in RECIPES if r.name == "st-vicuna-v1.3-10.5b-ppl")   # keeps 32 of 40
    small = next(r for r in RECIPES if r.name == "st-llama-1-5.5b-ppl")         # 26 blocks
    src = make_replica(tmp_path / "x", small, small_tokenizer)
    result = CliRunner().invoke(main, ["export", str(src), "--recipe", recipe.name, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "recipe st-vicuna-v1.3-10.5b-ppl names 32 blocks but the checkpoint holds 26" in result.stderr
