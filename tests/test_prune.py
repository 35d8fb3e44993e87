"""``export --remove-blocks`` and ``shortquant prune``.

--remove-blocks must write the very bytes an export of the checkpoint saved without those blocks
writes (each family, and a per-block DeciLM); the prune criteria must equal a direct transformers
computation (hooks on a plain forward, the model with a block deleted, autograd over the whole
model); the default search must do no worse on held-out text than the best one-shot criterion on
the trained demo model; --save-hf must export to the same bytes as --remove-blocks.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from click.testing import CliRunner

import pruned
from conftest import DEMO, DEMO_TOKENIZER
from families import EVAL_TEXT, STYLES, build_family_model, make_bpe_tokenizer
from shortquant import keys
from shortquant.cli import main
from shortquant.export import ExportOptions, export
from shortquant.layers import CONFIG_PRUNING
from shortquant.publish.card import _ranges
from test_bad_input import assert_one_line_error

QUANTS = ("f16", "q4_k_m")
FAMILIES = {   # name: (transformers family, tokenizer style, blocks, removed, overrides)
    "llama": ("llama", "llama3", 5, (1, 4), dict(tie_word_embeddings=True)),
    "qwen2": ("qwen2", "qwen2", 4, (0, 2), dict()),
    "qwen3": ("qwen3", "qwen2", 4, (3,), dict(head_dim=128)),
}


def run(*args, ok=True):
    result = CliRunner().invoke(main, [*map(str, args)])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.gguf"))}


def copy_non_weights(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if not (f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json") or f.name == "config.json"):
            shutil.copy(f, dst / f.name)


def save_without(model, src: Path, dst: Path, remove, source_blocks, count, method, config_edit=None):
    """The reference: ``model`` with the blocks deleted by hand, saved, with the provenance key."""
    copy_non_weights(src, dst)
    m = copy.deepcopy(model)
    for i in sorted(remove, reverse=True):
        del m.model.layers[i]
    m.config.num_hidden_layers = len(m.model.layers)
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = [t for i, t in enumerate(m.config.layer_types) if i not in remove]
    m.save_pretrained(dst)
    config = json.loads((dst / "config.json").read_text())
    config[CONFIG_PRUNING] = {"source_blocks": list(source_blocks), "source_block_count": count, "method": method}
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))


def assert_same_export(full: Path, saved: Path, remove, tmp: Path, extra=()):
    run("export", full, "--out", tmp / "a", "--name", "Same", "--quiet", "--remove-blocks",
        ",".join(map(str, remove)), *extra, *(a for q in QUANTS for a in ("-q", q)))
    run("export", saved, "--out", tmp / "b", "--name", "Same", "--quiet", *extra,
        *(a for q in QUANTS for a in ("-q", q)))
    a, b = files_of(tmp / "a"), files_of(tmp / "b")
    assert sorted(a) == sorted(b) and len(a) == len(QUANTS)
    for name in a:
        assert a[name] == b[name], name
    return tmp / "a"


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_blocks_writes_the_bytes_of_the_checkpoint_saved_pruned(tmp_path, family):
    hf, style, n, remove, overrides = FAMILIES[family]
    src = tmp_path / "full"
    vocab = make_bpe_tokenizer(src, style)
    model = build_family_model(hf, vocab, layers=n, hidden_size=256, intermediate_size=512, **overrides)
    model.save_pretrained(src)
    kept = [i for i in range(n) if i not in remove]
    save_without(model, src, tmp_path / "saved", remove, kept, n, "blocks removed by hand (--remove-blocks)")
    out = assert_same_export(src, tmp_path / "saved", remove, tmp_path, ("--pre", STYLES[style][5]))
    reader = gguf.GGUFReader(next(out.glob("*-F16.gguf")))
    assert list(reader.get_field(keys.SOURCE_BLOCKS).contents()) == kept
    assert reader.get_field(keys.SOURCE_BLOCK_COUNT).contents() == n
    assert "--remove-blocks" in reader.get_field(keys.PRUNING_METHOD).contents()


def test_remove_blocks_of_a_per_block_deci_model(tmp_path):
    model, src = pruned.decilm(tmp_path / "full")
    remove = (0, 3)

    def edit(config):
        config["block_configs"] = [b for i, b in enumerate(pruned.DECILM_BLOCKS) if i not in remove]
        config.update(architectures=["DeciLMForCausalLM"], model_type="nemotron-nas")
        config.pop("num_key_value_heads", None)
        config.pop("intermediate_size", None)

    save_without(model, src, tmp_path / "saved", remove, [1, 2], 4, "blocks removed by hand (--remove-blocks)", edit)
    out = assert_same_export(src, tmp_path / "saved", remove, tmp_path, ("--pad-ffn", "0"))
    reader = gguf.GGUFReader(next(out.glob("*-F16.gguf")))
    assert reader.get_field("general.architecture").contents() == "deci"


def test_remove_blocks_composes_with_known_provenance_and_the_card_says_so(tmp_path):
    # the demo model is itself pruned (recipe: 6 of 8 blocks kept); removing stored blocks 1 and 4
    # keeps the original indices of the rest
    from shortquant.recipes import load_recipe

    recipe = load_recipe("shortquant-demo")
    out = tmp_path / "out"
    run("export", "--remove-blocks", "1,4", "-q", "q8_0", "--out", out, "--card", "--quiet")
    reader = gguf.GGUFReader(next(out.glob("*.gguf")))
    kept = [b for i, b in enumerate(recipe.kept_blocks) if i not in (1, 4)]
    assert list(reader.get_field(keys.SOURCE_BLOCKS).contents()) == kept
    method = reader.get_field(keys.PRUNING_METHOD).contents()
    assert method.startswith(recipe.pruning.method) and "--remove-blocks" in method
    removed = sorted(set(range(recipe.pruning.source_block_count)) - set(kept))
    card = (out / "README.md").read_text()
    assert f"Removed blocks (0-based indices in the original model): {_ranges(removed)}" in card
    assert "--remove-blocks" in card


@pytest.mark.parametrize("blocks, fragment", [("9", "names block 9"), ("0-5", "all 6 blocks")])
def test_bad_remove_blocks_is_one_line(tmp_path, blocks, fragment):
    result = run("export", "--remove-blocks", blocks, "--out", tmp_path / "out", "--quiet", ok=False)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()
    result = run("export", "--remove-blocks", "1-x", "--out", tmp_path / "out", ok=False)
    assert result.exit_code == 2 and "is not a list" in result.output


# --- the criteria against transformers ------------------------------------------------------------

def demo_runners(chunks, held_apart, ctx=128):
    """Runners on the demo model: calibration on the first half of the story text, held out the rest."""
    from shortquant.families.hf_model import load_torch_model
    from shortquant.families.block_runner import BlockRunner
    from shortquant.quant.imatrix import chunk_tokens
    from shortquant.tokenizer.encode import encode_text

    text = EVAL_TEXT.read_text(encoding="utf-8")
    half = len(text) // 2
    ids, bos = encode_text(DEMO, text[:half])
    held_ids, _ = encode_text(DEMO, text[half:])
    model = load_torch_model(DEMO)
    return (BlockRunner(model, chunk_tokens(ids, ctx=ctx, chunks=chunks, bos_id=bos), held_apart=held_apart),
            BlockRunner(model, chunk_tokens(held_ids, ctx=128, chunks=None, bos_id=bos)))


@pytest.fixture(scope="module")
def demo_runner():
    return demo_runners(chunks=3, held_apart=1, ctx=96)


@pytest.fixture(scope="module")
def reference_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32).eval()


def search_chunks(runner):
    return [runner.chunks[i] for i in runner.search.indices]


def close(ours, theirs, rel=1e-4):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert math.isclose(a, b, rel_tol=rel), (ours, theirs)


def test_block_influence_equals_hooks_on_a_transformers_forward(demo_runner, reference_model):
    from shortquant.prune.criteria import block_influence

    runner, _ = demo_runner
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, args, kwargs, out, b=b: seen.setdefault(b, []).append(
        (kwargs.get("hidden_states", args[0] if args else None), out[0] if isinstance(out, tuple) else out)),
        with_kwargs=True) for b, layer in enumerate(reference_model.model.layers)]
    with torch.no_grad():
        for chunk in search_chunks(runner):
            reference_model(input_ids=chunk)
    for h in hooks:
        h.remove()
    direct = []
    for b in range(len(reference_model.model.layers)):
        cos = torch.cat([torch.nn.functional.cosine_similarity(x[0], y[0], dim=-1) for x, y in seen[b]])
        direct.append(float((1 - cos).mean()))
    close(block_influence(runner, runner.search), direct)


def direct_ppl(model, chunks) -> float:
    total = count = 0.0
    with torch.no_grad():
        for chunk in chunks:
            n = chunk.shape[1] - 1
            total += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * n
            count += n
    return math.exp(total / count)


def test_one_shot_ppl_equals_transformers_with_the_block_deleted(demo_runner, reference_model):
    from shortquant.prune.criteria import one_shot_ppl

    runner, _ = demo_runner
    direct = [direct_ppl(_without(reference_model, (b,)), search_chunks(runner))
              for b in range(len(reference_model.model.layers))]
    close(one_shot_ppl(runner, runner.search), direct)
    close([runner.ppl({1, 4}, runner.search)], [direct_ppl(_without(reference_model, (1, 4)), search_chunks(runner))])


def test_kld_equals_transformers_with_the_blocks_deleted(demo_runner, reference_model):
    runner, _ = demo_runner
    pruned_model = _without(reference_model, (1, 4))
    total = count = 0.0
    with torch.no_grad():
        for chunk in search_chunks(runner):
            ref = torch.log_softmax(reference_model(input_ids=chunk, use_cache=False).logits[0, :-1].double(), -1)
            got = torch.log_softmax(pruned_model(input_ids=chunk, use_cache=False).logits[0, :-1].double(), -1)
            total += float((ref.exp() * (ref - got)).sum())
            count += ref.shape[0]
    none, ours = runner.kld_many([(), (1, 4)], runner.search)
    assert abs(none) < 1e-6
    close([ours], [total / count])


def _without(model, remove):
    m = copy.deepcopy(model)
    for b in sorted(remove, reverse=True):
        del m.model.layers[b]
    m.config.num_hidden_layers = len(m.model.layers)
    return m


def test_taylor_equals_autograd_over_the_whole_model(demo_runner, reference_model):
    from shortquant.prune.criteria import taylor

    runner, _ = demo_runner
    m = copy.deepcopy(reference_model)
    chunks = search_chunks(runner)
    count = sum(c.shape[1] - 1 for c in chunks)
    for chunk in chunks:
        (m(input_ids=chunk, labels=chunk).loss * (chunk.shape[1] - 1) / count).backward()
    direct = [float(sum((p.detach().double() * p.grad.double()).abs().sum() for p in layer.parameters()))
              for layer in m.model.layers]
    close(taylor(runner, runner.search), direct)


@pytest.mark.slow   # the whole search on every chunk of the text: minutes on a loaded machine
def test_greedy_is_never_worse_on_held_out_text_than_the_best_one_shot():
    from shortquant.prune.search import measure

    runner, heldout = demo_runners(chunks=None, held_apart=6)   # every chunk: 26 of 128 tokens
    scores, choices = measure(runner, 2, "greedy", silent=True)
    one_shot = min(heldout.ppl(choices[c].removed, heldout.search) for c in ("bi", "ppl", "taylor"))
    assert heldout.ppl(choices["chosen"].removed, heldout.search) <= one_shot
    steps = choices["greedy"].steps
    assert len(steps) == 2 and steps[0].search_ppl <= steps[1].search_ppl
    assert choices["chosen"].how in ("swaps", "greedy", "bi", "ppl", "taylor")


class TableRunner:
    """A stand-in runner whose PPL of a removed set is a given function: the search logic alone."""

    def __init__(self, n, cost):
        from shortquant.families.block_runner import Split

        self.n_blocks, self.cost, self.asked = n, cost, 0
        self.search, self.held = Split("search", (0,)), Split("held-apart", (1,))

    def ppl(self, removed, split):
        return self.cost(frozenset(removed)) + (0.5 if split is self.held else 0.0)

    def ppl_many(self, candidates, split, progress=None):
        self.asked += len(candidates)
        return [self.ppl(c, split) for c in candidates]


def test_exchanges_take_back_a_greedy_choice_that_later_ones_made_a_poor_fit():
    from shortquant.prune.search import SWAP_ROUNDS, greedy, swaps

    # block 0 is the cheapest alone, but blocks 1 and 2 together cost less than 0 with anything
    pair = {frozenset({1, 2}): 3.0}
    runner = TableRunner(6, lambda r: pair.get(r, (1.0 if 0 in r else 2.0) + 2.5 * (len(r) - 1) + 0.01 * sum(r)))
    first = greedy(runner, 2)
    assert first.removed == (0, 1)
    asked = runner.asked
    better = swaps(runner, first)
    assert better.removed == (1, 2)
    assert [(s.put_back, s.block) for s in better.steps] == [(0, 2)]
    assert better.steps[0].search_ppl == 3.0 and better.held_ppl == 3.5
    assert runner.asked - asked <= SWAP_ROUNDS * 2 * (6 - 2)   # the cost bound the docstring states


def test_the_kld_objective_chooses_by_kld_and_reports_held_apart_ppl():
    from shortquant.prune.search import greedy, swaps

    runner = TableRunner(5, lambda r: 1.0 + sum(r))         # PPL: the lowest blocks are cheapest
    runner.kld_many = lambda sets, split, progress=None: [10.0 - sum(s) for s in sets]   # KLD: the highest
    first = greedy(runner, 2, objective="kld")
    assert first.removed == (3, 4) and first.steps[-1].search_ppl == 3.0 and first.held_ppl == 8.5
    assert swaps(runner, first, objective="kld").removed == (3, 4)   # already KLD's best pair


def test_exchanges_never_end_above_greedy_and_find_the_best_pair_on_the_demo(demo_runner):
    import itertools

    from shortquant.prune.search import default_pool, greedy, swaps

    runner, _ = demo_runner
    n = runner.n_blocks
    assert default_pool(n, 2) == n   # the default search on the demo chooses among every block
    first = greedy(runner, 2)
    better = swaps(runner, first)
    ppl = runner.ppl(better.removed, runner.search)
    assert ppl <= first.steps[-1].search_ppl
    assert all(a.search_ppl > b.search_ppl for a, b in zip([first.steps[-1], *better.steps], better.steps))
    pairs = {p: runner.ppl(p, runner.search) for p in itertools.combinations(range(n), 2)}
    assert better.removed == min(pairs, key=pairs.get), (better, sorted(pairs.items(), key=lambda kv: kv[1])[:3])
    assert math.isclose(ppl, pairs[better.removed], rel_tol=1e-12)


# --- the command -----------------------------------------------------------------------------------

def calib_file(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(EVAL_TEXT.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return path


def test_prune_exports_what_remove_blocks_exports_and_save_hf_too(tmp_path):
    src = tmp_path / "full"
    vocab = make_bpe_tokenizer(src, "llama3")
    build_family_model("llama", vocab, layers=3, hidden_size=256, intermediate_size=512).save_pretrained(src)
    result = run("prune", src, "--pre", "llama-bpe", "--remove", "1", "--calib", calib_file(tmp_path), "--ctx", "32",
                 "--chunks", "3",
                 "-q", "q8_0", "--out", tmp_path / "pruned", "--save-hf", tmp_path / "hf", "--json")
    report = json.loads(result.stdout[result.stdout.index("{"):])
    removed = report["chosen"]["removed"]
    assert len(removed) == 1 and set(report["choices"]) >= {"bi", "ppl", "taylor", "greedy"}
    written = next((tmp_path / "pruned").glob("*.gguf"))
    method = gguf.GGUFReader(written).get_field(keys.PRUNING_METHOD).contents()
    assert method.startswith("shortquant prune: ") and "calib.txt" in method
    options = dict(quants=("q8_0",), quiet=True, pre="llama-bpe")
    again = export(src, ExportOptions(out_dir=tmp_path / "again", remove_blocks=tuple(removed),
                                      pruning_method=method, **options))
    assert again.files[0].path.read_bytes() == written.read_bytes()
    # the saved checkpoint: num_hidden_layers fixed, the same GGUF under the same name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config[CONFIG_PRUNING]["method"] == method
    a = export(src, ExportOptions(out_dir=tmp_path / "a", remove_blocks=tuple(removed), pruning_method=method,
                                  name="Same", **options))
    b = export(tmp_path / "hf", ExportOptions(out_dir=tmp_path / "b", name="Same", **options))
    assert a.files[0].path.read_bytes() == b.files[0].path.read_bytes()


def test_prune_on_a_big_model_cuts_the_defaults_says_so_and_still_picks_on_the_held_apart_chunk(tmp_path, monkeypatch):
    from shortquant.prune import cost

    # the demo priced as if it were a big model on a budget it can only meet at the floors
    monkeypatch.setattr(cost, "SMALL_PARAMS", 0)
    monkeypatch.setattr(cost, "TARGET_RATIO", 0.01)
    result = run("prune", "--remove", "2", "--calib", calib_file(tmp_path), "--json")
    report = json.loads(result.stdout[result.stdout.index("{"):])
    c = report["cost"]
    assert c["reduced_for_cost"] and c["cut"] == ["taylor", "step checks", "pool", "chunks", "search ctx"]
    assert report["search_ctx"] == cost.MIN_SEARCH_CTX and report["ctx"] == cost.CTX and report["chunks"] == 2
    assert (c["search_tokens"], c["held_apart_tokens"], c["pool"]) == (cost.MIN_SEARCH_CTX, cost.CTX, 4)
    assert report["scores"]["taylor"] is None and "taylor" not in report["choices"] and not c["taylor"]
    steps = report["choices"]["greedy"]["steps"]
    assert steps[0]["held_apart_ppl"] is None and steps[-1]["held_apart_ppl"] == report["choices"]["greedy"][
        "held_apart_ppl"]
    best = min(report["choices"][k]["held_apart_ppl"] for k in ("swaps", "greedy", "bi", "ppl"))
    assert report["chosen"]["held_apart_ppl"] == best
    # every sweep listed: reference, one-shot, greedy step 2, exchange rounds (held checks ride along)
    whats = [s["what"].split(":")[0] for s in c["sweeps"]]
    assert whats[:3] == ["reference", "one-shot ppl", "greedy step 2"] and whats[3].startswith("exchanges")
    assert len(whats) == cost.sweeps(2, True, False) + len(report["choices"]["swaps"]["steps"])
    # the one stderr line (stdout stays the JSON document)
    line = [x for x in result.stderr.splitlines() if "defaults were cut" in x]
    assert len(line) == 1 and "Taylor+ not scored" in line[0] and "--ctx" in line[0]


def test_prune_bad_input_is_one_line(tmp_path):
    calib = calib_file(tmp_path)
    assert_one_line_error(run("prune", "--remove", "6", "--calib", calib, ok=False), "--remove 6", "6 blocks")
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.", encoding="utf-8")
    assert_one_line_error(run("prune", "--remove", "1", "--calib", short, ok=False), "at least 2")
    assert_one_line_error(run("prune", "--remove", "1", "--calib", calib, "--chunks", "3", "--held-apart", "3",
                              ok=False), "--held-apart 3", "none to search on")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert_one_line_error(run("prune", "--remove", "1", "--calib", calib, "--ctx", "64", "--chunks", "3",
                              "--save-hf", tmp_path / "full", ok=False), "not an empty folder")


def test_remove_blocks_of_an_llm_drop_model_keeps_its_drop_lists_right(tmp_path):
    # LLM-Drop's drop_attn_list / drop_mlp_list name blocks by index: removing block 2 must leave
    # them naming the same blocks (renumbered in the saved checkpoint)
    model, src = pruned.llm_drop(tmp_path / "full")

    def edit(config):
        config.update(drop_attn_list=[0], drop_mlp_list=[1, 3])

    save_without(model, src, tmp_path / "saved", (2,), [0, 1, 3, 4], 5, "blocks removed by hand (--remove-blocks)",
                 edit)
    assert_same_export(src, tmp_path / "saved", (2,), tmp_path, ("--pad-ffn", "0"))
