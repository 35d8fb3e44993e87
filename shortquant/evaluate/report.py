"""The size-vs-quality plot of one or more results.json files.

Two panels: bits per weight (or file size) against mean KLD and against perplexity. KLD is
drawn on a log axis (quant types span four decades, from 0.0003 for Q8_0 to 0.5 for a ternary
type on a non-ternary model). Perplexities more than 20 % above the best file's are pinned to
the top edge with their value in the label, so one broken type does not flatten the others.
Bits per weight are on a log axis when 16- or 32-bit files share the plot with 2-bit ones, so
the 3-8 bpw types that matter are not squeezed into a corner.

Every point is labelled with its type, labels placed so they never overlap (see
:mod:`shortquant.evaluate.labels`). Types on the Pareto front (nothing both smaller and better)
are coloured and joined by a line; dominated types (something smaller is also better) are
grey. Optimized files (``_OPT``, from ``export --optimize``) are a series of their own beside
llama.cpp's mixes, with their own front. An optional "unpruned" series (the unpruned model's results) gets its own colour, to
separate what pruning cost from what quantization cost.

Example::

    plot_report([read_results("results.json")], "report.png",
                unpruned=read_results("unpruned.json"))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shortquant import keys
from shortquant.errors import EvalError

X_AXES = {"bpw": ("bits per weight", lambda f: f.get("bpw")),
          "size": ("file size (GB)", lambda f: f["bytes"] / 1e9)}
Y_AXES = {"kld": ("mean KL divergence vs base (log)", lambda f: (f.get("kld") or {}).get("mean")),
          "ppl": ("perplexity", lambda f: f.get("ppl"))}

DPI = 110
DOMINATED = "0.62"         # grey of dominated markers
DOMINATED_TEXT = "0.42"    # grey of their labels (darker, to stay legible)
LOG_X_SPAN = 4.0              # bits per weight on a log axis when max / min exceeds this
PPL_SHOWN_ABOVE_BEST = 1.2    # perplexities over 1.2x their series' best are pinned to the top edge


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both x and y (lower is better), by x.

    Example::

        pareto_front([(1, 5), (2, 3), (3, 4)])   # [0, 1]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y = [], float("inf")
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _series(files: list[dict], x_of, y_of):
    """(x, y, label) per distinct point; types landing on the same point share one label."""
    points: dict[tuple[float, float], list[str]] = {}
    for f in files:
        x, y = x_of(f), y_of(f)
        if x is not None and y is not None:
            points.setdefault((float(x), float(y)), []).append(f["type"])
    return [(x, y, ", ".join(labels)) for (x, y), labels in points.items()]


def _is_base(entry: dict, base: str) -> bool:
    """True when a results entry is the KLD base itself (paths compared resolved, or by name)."""
    for key in ("path", "file"):
        value = entry.get(key)
        if not value:
            continue
        if value == base or Path(value).name == Path(base).name:
            return True
        try:
            if Path(value).resolve() == Path(base).resolve():
                return True
        except OSError:
            pass
    return False


def _files_of(data: dict) -> list[dict]:
    """The files of one results.json; the base itself is left out of the KLD panel (KLD ~ 0)."""
    base = (data.get("settings") or {}).get("base")
    out = []
    for f in data["files"]:
        if base and f.get("kld") and _is_base(f, str(base)):
            f = dict(f, kld=None)
        out.append(f)
    return out


@dataclass
class _Group:
    name: str
    points: list[tuple[float, float, str]]   # measured (x, y, label)
    color: str
    marker: str

    @property
    def front(self) -> set[int]:
        return set(pareto_front([(x, y) for x, y, _ in self.points]))


@dataclass
class _Panel:
    y_label: str
    groups: list[_Group]
    log_y: bool
    cap: float | None = None      # values above are pinned to the top edge
    hidden: tuple[str, ...] = ()  # types with no place on a log axis (KLD <= 0)


# Optimized files (``export --optimize``: type names ending in _OPT) get their own series beside
# llama.cpp's mixes, so a measured variant is seen against its standard mix at the same size.
OPTIMIZED_STYLE = {"tab:blue": ("tab:green", "D"), "tab:orange": ("tab:red", "D")}


def _split_optimized(name: str, files: list[dict], color: str, marker: str) -> list[tuple]:
    """One series as two when it holds optimized files: llama.cpp's mixes, and the _OPT files."""
    optimized = [f for f in files if str(f.get("type", "")).endswith(keys.OPT_SUFFIX)]
    if not optimized:
        return [(name, files, color, marker)]
    standard = [f for f in files if f not in optimized]
    opt_color, opt_marker = OPTIMIZED_STYLE.get(color, (color, "D"))
    label = "" if name == "files" else f"{name}, "
    return [(f"{label}llama.cpp mixes", standard, color, marker),
            (f"{label}optimized (_OPT)", optimized, opt_color, opt_marker)]


def _groups(files, unpruned_files, x_of, y_of, log_y: bool) -> tuple[list[_Group], list[str]]:
    """The series of one panel, and the types left out because a log axis cannot show them (<= 0)."""
    specs = [("pruned" if unpruned_files else "files", files, "tab:blue", "o")]
    if unpruned_files:
        specs.append(("unpruned", unpruned_files, "tab:orange", "s"))
    specs = [split for spec in specs for split in _split_optimized(*spec)]
    groups, hidden = [], []
    for name, group_files, color, marker in specs:
        points = _series(group_files, x_of, y_of)
        hidden += [label for _, y, label in points if log_y and y <= 0]
        points = [p for p in points if p[1] > 0 or not log_y]
        if points:
            groups.append(_Group(name, points, color, marker))
    return groups, hidden


def _make_panel(key: str, files, unpruned_files, x_of) -> _Panel | None:
    y_label, y_of = Y_AXES[key]
    log_y = key == "kld"
    groups, hidden = _groups(files, unpruned_files, x_of, y_of, log_y)
    if not groups:
        return None
    cap = None
    if key == "ppl":   # a few broken types (ternary on a normal model) must not flatten the rest
        limit = max(min(p[1] for p in g.points) for g in groups) * PPL_SHOWN_ABOVE_BEST   # per series
        if any(p[1] > limit for g in groups for p in g.points):
            cap = limit
            y_label += f" (\u25b2: above {cap:.4g}, value in the label)"
    return _Panel(y_label, groups, log_y, cap, tuple(hidden))


def _shown(panel: _Panel, point: tuple[float, float, str], top: float) -> tuple[float, float, str]:
    """Where a point is drawn and its label: a capped point sits on the top edge, value in its label."""
    x, y, label = point
    if panel.cap is not None and y > panel.cap:
        return x, top, f"{label} \u2191{y:.4g}"
    return point


def _limits(values: list[float], log: bool, pad: float) -> tuple[float, float]:
    """Axis limits around ``values`` with room for labels: a factor on log axes, a fraction on linear."""
    low, high = min(values), max(values)
    if log:
        factor = max((high / low) ** pad if high > low else 1.5, 1.25)
        return low / factor, high * factor
    span = (high - low) or abs(high) or 1.0
    return low - pad * span, high + pad * span


def _set_log_ticks(axis) -> None:
    """Plain numbers (3, 4, 6, 8, 16) instead of 10^x on a log bits-per-weight axis."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    low, high = axis.get_view_interval()
    candidates = [1, 1.5, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64]
    ticks = [t for t in candidates if low <= t <= high]
    if len(ticks) >= 3:
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_locator(NullLocator())


def _draw_panel(ax, panel: _Panel, x_label: str) -> None:
    """Markers, front lines, scales and limits (labels come later, once the layout is final)."""
    all_x = [p[0] for g in panel.groups for p in g.points]
    log_x = min(all_x) > 0 and max(all_x) / min(all_x) > LOG_X_SPAN
    in_range = [p[1] for g in panel.groups for p in g.points if panel.cap is None or p[1] <= panel.cap]
    y_low, y_high = _limits(in_range, panel.log_y, 0.08)
    for group in panel.groups:
        front = group.front
        shown = [_shown(panel, p, y_high) for p in group.points]
        for members, color in ((front, group.color), (set(range(len(shown))) - front, DOMINATED)):
            for capped in (False, True):
                idx = [i for i in members if (shown[i][1] != group.points[i][1]) == capped]
                ax.scatter([shown[i][0] for i in idx], [shown[i][1] for i in idx], color=color, zorder=3,
                           marker="^" if capped else group.marker, clip_on=False)
        ordered = sorted(front, key=lambda i: shown[i][0])
        ax.plot([shown[i][0] for i in ordered], [shown[i][1] for i in ordered], color=group.color,
                linewidth=1.2, zorder=2, clip_on=False)
    if log_x:
        ax.set_xscale("log")
    if panel.log_y:
        ax.set_yscale("log")
    ax.set_xlim(*_limits(all_x, log_x, 0.06))
    ax.set_ylim(y_low, y_high)
    if log_x:
        _set_log_ticks(ax.xaxis)
    ax.set_xlabel(x_label + (" (log)" if log_x else ""))
    ax.set_ylabel(panel.y_label, fontsize=9)
    if panel.hidden:
        ax.set_title(f"KLD <= 0, not on the log axis: {', '.join(panel.hidden)}", fontsize=8, loc="left")
    ax.grid(True, which="major", alpha=0.3)


def _label_panel(ax, panel: _Panel) -> None:
    """Labels after the layout is final: front points first (they get the best spots), by x."""
    from shortquant.evaluate.labels import place_labels

    top = ax.get_ylim()[1]
    labels, colors = [], []
    for group in panel.groups:
        front = group.front
        order = sorted(range(len(group.points)), key=lambda i: (i not in front, group.points[i][0]))
        for i in order:
            labels.append(_shown(panel, group.points[i], top))
            colors.append("black" if i in front else DOMINATED_TEXT)
    place_labels(ax, labels, color=colors)


def _legend(fig, groups: list[_Group]) -> None:
    from matplotlib.lines import Line2D

    handles = []
    for group in groups:
        handles.append(Line2D([], [], color=group.color, marker=group.marker,
                              label=f"{group.name}: Pareto front (no smaller type is as good)"))
        handles.append(Line2D([], [], color=DOMINATED, marker=group.marker, linestyle="none",
                              label=f"{group.name}: dominated (a smaller type is as good or better)"))
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)


def report_figure(results: list[dict], *, unpruned: dict | None = None, x_axis: str = "bpw",
                  title: str | None = None):
    """The report as a matplotlib Figure (Agg backend), labels placed; :func:`plot_report` saves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = [f for data in results for f in _files_of(data)]
    unpruned_files = _files_of(unpruned) if unpruned else []
    x_label, x_of = X_AXES[x_axis]
    if x_axis == "size" and all(f["bytes"] < 1e9 for f in files + unpruned_files):
        x_label, x_of = "file size (MB)", lambda f: f["bytes"] / 1e6   # small models: readable ticks
    panels = [panel for key in Y_AXES if (panel := _make_panel(key, files, unpruned_files, x_of))]
    if not panels:
        raise EvalError("nothing to plot: the results have neither KLD nor perplexity values")

    fig, axes = plt.subplots(1, len(panels), figsize=(7.0 * len(panels), 6.4), dpi=DPI, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        _draw_panel(ax, panel, x_label)
    fig.suptitle(title or "size vs quality")
    _legend(fig, panels[0].groups)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.canvas.draw()   # the layout is final: label boxes can be measured now
    for ax, panel in zip(axes[0], panels):
        _label_panel(ax, panel)
    return fig


def plot_report(results: list[dict], output: str | Path, *, unpruned: dict | None = None,
                x_axis: str = "bpw", title: str | None = None) -> Path:
    """Draw the report PNG (or PDF/SVG by suffix) and return its path (written whole or not at all)."""
    import io

    from shortquant.partfiles import write_atomic

    fig = report_figure(results, unpruned=unpruned, x_axis=x_axis, title=title)
    import matplotlib.pyplot as plt   # after report_figure chose the Agg backend

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format=output.suffix.lstrip(".").lower() or "png", dpi=DPI)
    plt.close(fig)
    return write_atomic(output, image.getvalue())
