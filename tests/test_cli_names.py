"""Names typed on the command line: what `--quant all` means, and "did you mean ...?" for typos.

Every check runs the real CLI on the embedded demo model; the typo errors must come before
any weight is read or any file is written.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from shortquant.cli import main
from shortquant.quant.types import ALL_NAMES, QUANT_NAMES, TERNARY_NAMES, parse_quants


def _run(*args):
    return CliRunner().invoke(main, list(args))


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_all_leaves_out_the_ternary_types_which_stay_available_by_name():
    result = _run("inspect", "--quant", "all", "--json")
    assert result.exit_code == 0, result.output
    types = [f["type"] for f in json.loads(result.stdout)["files"]]
    assert types == [name.upper() for name in QUANT_NAMES if name not in ("tq1_0", "tq2_0")]
    assert len(types) == len(QUANT_NAMES) - 2 == 30

    result = _run("inspect", "--quant", "all", "--quant", "TQ1_0", "--quant", "tq2_0", "--json")
    assert result.exit_code == 0, result.output
    types = [f["type"] for f in json.loads(result.stdout)["files"]]
    assert types[-2:] == ["TQ1_0", "TQ2_0"] and len(types) == 32


def test_all_in_the_library_matches_the_cli():
    assert [q.name for q in parse_quants(["all"])] == list(ALL_NAMES)
    assert set(QUANT_NAMES) - set(ALL_NAMES) == set(TERNARY_NAMES) == {"tq1_0", "tq2_0"}


@pytest.mark.parametrize("command", ["export", "inspect"])
def test_help_says_all_leaves_out_ternary(command):
    result = _run(command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "'all' is every type but the ternary tq1_0/tq2_0" in text


@pytest.mark.parametrize("args, typed, meant", [
    (["--quant", "q4km"], "'q4km'", "q4_k_m"),
    (["--quant", "IQ4XS"], "'IQ4XS'", "iq4_xs"),
    (["--quant", "q8_1"], "'q8_1'", "q8_0"),
    (["--output-type", "q6k"], "'q6k'", "q6_k"),
    (["--embedding-type", "Q4-0"], "'Q4-0'", "q4_0"),
    (["--tensor-type", "ffn_down=q5k"], "'q5k'", "q5_k"),
])
def test_mistyped_type_suggests_the_likely_one_before_the_list(tmp_path, args, typed, meant):
    out = tmp_path / "out"
    line = _one_line_error(_run("export", "--out", str(out), "--quiet", *args))
    assert f"{typed}: did you mean {meant}?" in line
    hint, listed = line.index("did you mean"), line.index("valid: ")
    assert hint < listed and meant in line[listed:]   # the full list still follows
    assert not out.exists()


def test_unknown_type_with_nothing_close_lists_all_names(tmp_path):
    line = _one_line_error(_run("export", "--out", str(tmp_path / "o"), "--quant", "zzzz"))
    assert "did you mean" not in line
    assert "unknown quantization type 'zzzz'; valid: f32, f16" in line and line.endswith("tq1_0, all")


def test_mistyped_recipe_and_chat_template_suggest_the_likely_one():
    line = _one_line_error(_run("inspect", "--recipe", "st-vicuna-v13-5.5b-taylor"))
    assert "did you mean st-vicuna-v1.3-5.5b-taylor?" in line and "known: " in line
    line = _one_line_error(_run("inspect", "--chat-template", "llama2"))
    assert "unknown chat template 'llama2': did you mean llama-2?" in line
    assert line.endswith("known: llama-2, none, vicuna")
