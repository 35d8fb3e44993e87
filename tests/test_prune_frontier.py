"""``prune --budget``: the pruning-vs-quantization frontier at one file size.

On the embedded demo model (trained, 6 blocks): every file written is within the budget and is
the highest type that fits (the next type up, written by export with the same removal, is over
it); the k-block sets are the greedy search's first k removals; the unpruned F16 reference's
KLD against itself is ~0; the table's KLD and PPL are what `shortquant eval` reports for the same
file; bad input (held-out text = calibration text, a budget nothing meets, --budget without
--text) is one line, exit 2, before any measuring.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import gguf
import pytest

from conftest import DEMO
from families import EVAL_TEXT
from shortquant import keys
from shortquant.export import export, options_from
from shortquant.prune.frontier import LADDER, planned_sizes
from shortquant.source.checkpoint import open_checkpoint
from test_bad_input import assert_one_line_error
from test_prune import run

REMOVE = 2
SEARCH = ("--ctx", "32", "--chunks", "2", "--threads", "2")
EVAL = ("--eval-ctx", "64", "--eval-chunks", "3")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("texts")
    text = EVAL_TEXT.read_text(encoding="utf-8")
    (folder / "calib.txt").write_text(text[:6000], encoding="utf-8")
    (folder / "heldout.txt").write_text(text[7000:], encoding="utf-8")   # disjoint from the calibration
    return folder / "calib.txt", folder / "heldout.txt"


def unpruned_size(quant: str) -> int:
    _, options = options_from(None, Path("unused"), quants=(quant,))
    return planned_sizes(open_checkpoint(DEMO), options)[quant]


@pytest.fixture(scope="module")
def frontier(tmp_path_factory, texts):
    """One frontier run on the demo at the size of its unpruned Q4_K_M (so k=0 fits exactly)."""
    tmp = tmp_path_factory.mktemp("frontier")
    budget = unpruned_size("q4_k_m")
    calib, heldout = texts
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHORTQUANT_CACHE", str(tmp / "cache"))
        result = run("prune", "--budget", budget, "--remove", REMOVE, "--calib", calib, "--text", heldout, *SEARCH,
                     *EVAL, "--out", tmp / "out", "--json")
    return json.loads(result.stdout[result.stdout.index("{"):]), budget, tmp


def test_every_file_is_the_highest_type_within_the_budget(frontier):
    report, budget, tmp = frontier
    rows = report["frontier"]["rows"]
    assert [r["k"] for r in rows] == list(range(REMOVE + 1)) and rows[0]["type"] == "Q4_K_M"
    greedy = [s["block"] for s in report["choices"]["greedy"]["steps"]]
    for row in rows:
        path = Path(row["path"])
        assert row["removed"] == sorted(greedy[:row["k"]])   # the search's first k removals, nested
        assert path.stat().st_size == row["planned_bytes"] == row["bytes"] <= budget
        assert set(row["planned_sizes"]) == {q.upper() for q in LADDER}
        assert all(n > budget for n in row["planned_sizes"].values() if n > row["planned_bytes"])
        reader = gguf.GGUFReader(path)
        assert reader.get_field("llama.block_count").contents() == 6 - row["k"]
        if row["k"]:   # the file says how its blocks were chosen (after the demo recipe's own method)
            method = reader.get_field(keys.PRUNING_METHOD).contents()
            assert method.endswith(row["method"]) and "greedy" in method and "calib.txt" in method
        # the next type up, written by export with the same removal: really over the budget
        up = row["next_type_up"]
        _, options = options_from(None, tmp / f"up{row['k']}", quants=(up["type"].lower(),),
                                  remove_blocks=row["removed"] or None)
        options = dataclasses.replace(options, pruning_method=row["method"])
        written = export(DEMO, dataclasses.replace(options, quiet=True)).files[0]
        assert written.bytes == up["planned_bytes"] > budget


def test_reference_and_winner(frontier):
    report, _, _ = frontier
    table = report["frontier"]
    assert table["reference"]["type"] == "F16" and abs(table["reference"]["kld"]) < 1e-5
    assert table["winner"] == min(table["rows"], key=lambda r: r["kld"])["k"]
    assert Path(table["plot"]).read_bytes()[:4] == b"\x89PNG"
    results = json.loads(Path(table["results"]).read_text())
    assert len(results["files"]) == REMOVE + 2   # each candidate and the reference


def test_table_is_what_eval_reports(frontier, texts):
    report, _, tmp = frontier
    table = report["frontier"]
    rows = table["rows"]
    result = run("eval", *(r["path"] for r in rows), "--base", table["reference"]["path"], "--text", texts[1],
                 "--ctx", "64", "--chunks", "3", "--threads", "2", "--cache-dir", tmp / "eval-cache", "--json",
                 "--quiet")
    files = json.loads(result.stdout)["files"]
    for row, measured in zip(rows, files):
        assert (row["kld"], row["ppl"], row["bpw"]) == (measured["kld"]["mean"], measured["ppl"], measured["bpw"])


def test_bad_budget_input_is_one_line_before_any_measuring(tmp_path, texts):
    calib, heldout = texts
    same = tmp_path / "same.txt"
    same.write_text(calib.read_text(encoding="utf-8"), encoding="utf-8")
    base = ("prune", "--remove", REMOVE, "--calib", calib, *SEARCH)
    assert_one_line_error(run(*base, "--budget", "3M", "--text", same, ok=False), "same.txt", "same content")
    assert_one_line_error(run(*base, "--budget", "3M", ok=False), "--budget 3M", "--text")
    assert_one_line_error(run(*base, "--text", heldout, ok=False), "--text", "--budget")
    assert_one_line_error(run("prune", "--calib", calib, ok=False), "--remove K")
    assert_one_line_error(run(*base, "--budget", "3Q", "--text", heldout, ok=False), "--budget", "invalid size")
    # nothing fits: the message names the smallest file possible, and that size is accepted
    result = run(*base, "--budget", "1M", "--text", heldout, ok=False)
    assert_one_line_error(result, "no option fits", f"Q2_K with {REMOVE} blocks removed")
    smallest = int(re.search(r"\(([\d,]+) bytes\)", result.stderr).group(1).replace(",", ""))
    assert smallest < unpruned_size("q2_k")
    assert_one_line_error(run(*base, "--budget", smallest - 1, "--text", heldout, ok=False), "no option fits")
    # at exactly that size the budget check passes: the next check (calibration chunks) is what fails
    assert_one_line_error(run("prune", "--remove", REMOVE, "--calib", calib, "--ctx", "100000", "--budget", smallest,
                              "--text", heldout, ok=False), "at least 2")
