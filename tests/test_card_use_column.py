"""The card's "Use" column says something for every type, and the card says why a file is recommended.

The files are real exports of the embedded demo model (IQ3_M and the ternary types included);
the card is written by the `card` command and read back from README.md.
"""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from publish_helpers import make_results
from shortquant.cli import main
from shortquant.publish.card import TYPE_NOTES
from shortquant.quant.types import QUANT_NAMES

TYPES = ("q8_0", "q4_k_m", "iq3_m", "q2_k", "tq2_0", "tq1_0")


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "gguf"
    args = ["export", "--out", str(out), "--quiet"] + [a for t in TYPES for a in ("-q", t)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


def _files(folder):
    return {p.name.rsplit("-", 1)[1].removesuffix(".gguf"): p.name for p in folder.glob("*.gguf")}


def _card(folder, measured: dict | None = None) -> str:
    """README.md as the `card` command writes it, with ``measured`` as results.json (then removed)."""
    if measured:
        make_results(folder, measured)
    try:
        result = CliRunner().invoke(main, ["card", str(folder), "--quiet", "--no-modelfile"])
    finally:
        (folder / "results.json").unlink(missing_ok=True)
    assert result.exit_code == 0, result.output
    return (folder / "README.md").read_text()


def _use_column(text: str) -> dict[str, str]:
    section = text.split("## Files\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        out[cells[header.index("Type")]] = cells[header.index("Use")]
    return out


def test_every_type_llama_quantize_offers_has_a_note():
    assert {name.upper() for name in QUANT_NAMES} <= set(TYPE_NOTES)


def test_use_column_filled_and_rule_stated_without_measurements(ladder):
    text = _card(ladder)
    use = _use_column(text)
    assert set(use) == {t.upper() for t in TYPES}
    assert all(note for note in use.values()), use
    assert "ternary" in use["TQ1_0"] and "trained ternary" in use["TQ2_0"]
    assert "i-quant" in use["IQ3_M"]
    assert use["Q4_K_M"].startswith("**recommended**")
    assert ("Recommended file: Q4_K_M, the usual balance of size and quality for llama.cpp "
            "(nothing was measured against a reference).") in text


def test_recommendation_rule_from_measurements(ladder):
    files = _files(ladder)

    def kld(mean, top1):
        return {"mean": mean, "err": mean / 10, "same_top1": top1}

    measured = {
        files["Q8_0"]: {"type": "Q8_0", "ppl": 5.0, "kld": kld(0.0004, 0.99)},
        files["Q4_K_M"]: {"type": "Q4_K_M", "ppl": 5.1, "kld": kld(0.01, 0.95)},
        files["IQ3_M"]: {"type": "IQ3_M", "ppl": 5.4, "kld": kld(0.03, 0.91)},
        files["Q2_K"]: {"type": "Q2_K", "ppl": 6.5, "kld": kld(0.2, 0.80)},
        files["TQ2_0"]: {"type": "TQ2_0", "ppl": 40.0, "kld": kld(0.47, 0.40)},
        files["TQ1_0"]: {"type": "TQ1_0", "ppl": 40.0, "kld": kld(0.47, 0.40)},
    }
    sizes = {t: (ladder / name).stat().st_size for t, name in files.items()}
    text = _card(ladder, measured)
    use = _use_column(text)
    # the smallest file with >= 90 % top-1 agreement: IQ3_M if it is smaller than Q4_K_M
    expected = min(("Q8_0", "Q4_K_M", "IQ3_M"), key=sizes.get)
    assert use[expected].startswith("**recommended**")
    assert sum(note.startswith("**recommended**") for note in use.values()) == 1
    assert re.search(rf"Recommended file: {expected}, the smallest file whose most likely next token "
                     r"matches the reference's at least 90 % of the time \(measured: 9\d\.\d %\)\.", text)
    # a file beaten on size and KLD says so, naming the better one (TQ2_0: TQ1_0 is smaller, same KLD)
    klds = {t: measured[files[t]]["kld"]["mean"] for t in files}
    for t in files:
        beaten = [o for o in files if o != t and sizes[o] <= sizes[t] and klds[o] <= klds[t]
                  and (sizes[o], klds[o]) != (sizes[t], klds[t])]
        assert ("is no larger and at least as close to the reference" in use[t]) == bool(beaten), (t, use[t])
    assert "here TQ1_0 is no larger" in use["TQ2_0"]


def test_no_file_meets_the_rule(ladder):
    files = _files(ladder)
    text = _card(ladder, {files[t]: {"type": t, "ppl": 9.0, "kld": {"mean": 0.5, "same_top1": 0.5}}
                          for t in ("Q8_0", "Q2_K")})
    assert ("Recommended file: Q4_K_M, the usual balance of size and quality for llama.cpp (no file's most "
            "likely next token matches the reference's 90 % of the time).") in text


def test_an_optimized_file_is_compared_with_its_mix():
    """A measured Q4_K_M_OPT beside a measured Q4_K_M: its Use note says how its KLD compares;
    unmeasured, or no base mix in the folder: nothing added."""
    from types import SimpleNamespace

    from shortquant.publish.card import _versus_base_mix, type_note

    base = SimpleNamespace(name="m-Q4_K_M.gguf", type="Q4_K_M", bytes=105_000_000)
    opt = SimpleNamespace(name="m-Q4_K_M_OPT.gguf", type="Q4_K_M_OPT", bytes=104_999_000)
    measured = {base.name: {"kld": {"mean": 0.0400}}, opt.name: {"kld": {"mean": 0.0300}}}
    assert _versus_base_mix(opt, [base, opt], measured) == "; KLD -25 % against Q4_K_M (smaller)"
    assert _versus_base_mix(base, [base, opt], measured) == ""
    assert _versus_base_mix(opt, [opt], measured) == ""
    assert _versus_base_mix(opt, [base, opt], {opt.name: measured[opt.name]}) == ""
    assert type_note("Q4_K_M_OPT").startswith("a measured variant of Q4_K_M")
