"""The size-vs-quality plot is readable: checked from the figure's own artists.

The points are the demo ladder's measured numbers (`shortquant export -q all -q tq1_0 -q tq2_0`,
then `shortquant eval *.gguf --base ...-F32.gguf`), ternary types far out included: the crowded
3-6 bpw region and the outliers are what the label placement has to cope with.
"""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("matplotlib")

from matplotlib.text import Annotation, Text  # noqa: E402

from shortquant.evaluate.report import DOMINATED_TEXT, plot_report, report_figure  # noqa: E402

N_PARAMS = 4_984_064
# type, bits per weight, perplexity, mean KLD, same top-1 (KLD against the F32 file)
DEMO = [
    ("BF16", 16.0107, 21.2841, 4.238e-06, 0.9979), ("F16", 16.0107, 21.2829, -1.32e-07, 1.0),
    ("F32", 32.0, 21.2831, -1.92e-07, 1.0), ("IQ3_M", 3.6645, 21.4481, 0.010042, 0.9210),
    ("IQ3_S", 3.5388, 21.4334, 0.012801, 0.9095), ("IQ4_NL", 4.5726, 21.3270, 0.002668, 0.9563),
    ("IQ4_XS", 4.3293, 21.2718, 0.002942, 0.9572), ("Q2_K", 3.0366, 22.2466, 0.042217, 0.8676),
    ("Q3_K_L", 4.2710, 21.5434, 0.008202, 0.9348), ("Q3_K_M", 3.9291, 21.6047, 0.008419, 0.9342),
    ("Q3_K_S", 3.5388, 21.5978, 0.010745, 0.9222), ("Q4_0", 4.5726, 21.2114, 0.003164, 0.9557),
    ("Q4_1", 5.0591, 21.3922, 0.002567, 0.9626), ("Q4_K_M", 4.7624, 21.2903, 0.002317, 0.9575),
    ("Q4_K_S", 4.5989, 21.3204, 0.002096, 0.9620), ("Q5_0", 5.5456, 21.2959, 0.000827, 0.9777),
    ("Q5_1", 6.0322, 21.3247, 0.000732, 0.9753), ("Q5_K_M", 5.6434, 21.3211, 0.000723, 0.9783),
    ("Q5_K_S", 5.5456, 21.3230, 0.000728, 0.9771), ("Q6_K", 6.5795, 21.2741, 0.000309, 0.9840),
    ("Q8_0", 8.5157, 21.2888, 5.436e-05, 0.9934), ("TQ1_0", 1.9099, 30.5752, 0.541612, 0.4615),
    ("TQ2_0", 2.2649, 30.5752, 0.541612, 0.4615),
]


def _results(rows=DEMO, prefix="Demo", n_params=N_PARAMS):
    files = [{"file": f"{prefix}-{t}.gguf", "path": f"/x/{prefix}-{t}.gguf", "type": t,
              "bytes": int(bpw * n_params / 8), "n_params": n_params, "bpw": bpw, "ppl": ppl, "ppl_err": 0.7,
              "kld": {"mean": kld, "err": abs(kld) / 30, "same_top1": top1}, "speed": None}
             for t, bpw, ppl, kld, top1 in rows]
    return {"files": files, "settings": {"ctx": 512, "base": f"/x/{prefix}-F32.gguf"}}


def _labels(ax) -> list[Annotation]:
    return [t for t in ax.texts if isinstance(t, Annotation)]


def _check_readable(fig, leaders_clear=True):
    """Text boxes (an annotation's own extent also covers its leader line) apart and inside the axes;
    with ``leaders_clear``, no leader line runs through another label."""
    fig.canvas.draw()   # as savefig does: annotations take their final positions
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        labels = _labels(ax)
        boxes = [(a.get_text(), Text.get_window_extent(a, renderer)) for a in labels]
        assert boxes
        for (name_a, a), (name_b, b) in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), f"labels {name_a} and {name_b} overlap"
        for name, box in boxes:
            assert frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1), f"{name} outside the axes"
            assert box.height >= 8, f"{name} too small to read"
        for label in labels:
            if label.arrow_patch is None or not leaders_clear:
                continue
            path = label.arrow_patch.get_path().transformed(label.arrow_patch.get_transform())
            for name, box in boxes:
                if name != label.get_text():
                    assert not path.intersects_bbox(box, filled=False), f"leader of {label.get_text()} crosses {name}"


def test_demo_ladder_kld_axis_is_log_and_labels_never_overlap():
    fig = report_figure([_results()])
    kld_ax, ppl_ax = fig.axes
    assert kld_ax.get_yscale() == "log"
    assert kld_ax.get_xscale() == "log"          # 2 to 16 bpw: the 3-8 bpw types get the room
    _check_readable(fig)
    # every type labelled once; the F32 base is left out of the KLD panel, F16 (KLD < 0) is named
    kld_labels = sorted(a.get_text() for a in _labels(kld_ax))
    assert kld_labels == sorted(t for t, *_ in DEMO if t not in ("F32", "F16"))
    assert "F16" in kld_ax.get_title(loc="left")
    # the axis spans the measured KLDs, not a decade more on either side
    low, high = kld_ax.get_ylim()
    assert 1e-6 < low < 4.2e-6 and 0.54 < high < 3.0


def test_pareto_front_coloured_and_dominated_types_grey():
    fig = report_figure([_results()])
    colours = {a.get_text(): a.get_color() for a in _labels(fig.axes[0])}
    # TQ2_0: TQ1_0 is smaller at the same KLD; Q4_1: Q4_K_S is smaller and closer; Q5_1: Q5_K_M
    for dominated in ("TQ2_0", "Q4_1", "Q5_1", "IQ3_S", "Q4_K_M"):
        assert colours[dominated] == DOMINATED_TEXT, dominated
    for front in ("TQ1_0", "Q2_K", "Q3_K_S", "Q4_K_S", "Q5_K_S", "Q6_K", "Q8_0", "BF16"):
        assert colours[front] == "black", front


def test_far_out_perplexities_are_pinned_with_their_value():
    fig = report_figure([_results()])
    ppl_ax = fig.axes[1]
    texts = {a.get_text().split(" ")[0]: a for a in _labels(ppl_ax)}
    assert texts["TQ1_0"].get_text() == "TQ1_0 \u219130.58"
    assert texts["TQ1_0"].xy[1] == pytest.approx(ppl_ax.get_ylim()[1])
    assert ppl_ax.get_ylim()[1] < 22.5          # the useful types keep the height
    assert texts["Q2_K"].get_text() == "Q2_K"


def test_unpruned_series_and_size_axis_stay_readable(tmp_path):
    # the unpruned model: 8 blocks instead of 6 (larger files), lower perplexity, a little less KLD
    unpruned = _results([(t, bpw, ppl * 0.8, kld * 0.7, top1) for t, bpw, ppl, kld, top1 in DEMO[3:15]],
                        prefix="Base", n_params=int(N_PARAMS * 1.3))
    fig = report_figure([_results()], unpruned=unpruned, x_axis="size")
    _check_readable(fig, leaders_clear=False)   # 35 points in one cluster: leaders may cross labels
    assert len(_labels(fig.axes[0])) == len(DEMO) - 2 + 12
    assert plot_report([_results()], tmp_path / "r.png", unpruned=unpruned).read_bytes()[:4] == b"\x89PNG"


def test_optimized_files_are_a_series_beside_llama_cpps_mixes():
    """_OPT files (export --optimize, measured: the smollm2 table in README) are drawn in their
    own colour and marker, with their own front, and the legend names both series."""
    from matplotlib.colors import to_hex

    rows = [r for r in DEMO if r[0] in ("Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F32")]
    rows += [("Q4_K_M_OPT", 4.7620, 21.28, 0.00057, 0.980), ("Q3_K_M_OPT", 3.9287, 21.40, 0.00164, 0.962)]
    fig = report_figure([_results(rows)])
    kld_ax = fig.axes[0]
    _check_readable(fig)
    colours = {a.get_text(): a.get_color() for a in _labels(kld_ax)}
    assert colours["Q4_K_M_OPT"] == colours["Q3_K_M_OPT"] == "black"   # fronts of their own series
    markers = {}
    for collection in kld_ax.collections:
        for x, _ in collection.get_offsets():
            markers[round(float(x), 4)] = to_hex(collection.get_facecolor()[0])
    assert markers[4.762] == to_hex("tab:green") and markers[4.7624] == to_hex("tab:blue")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("llama.cpp mixes") for t in legend)
    assert any(t.startswith("optimized (_OPT)") for t in legend)
