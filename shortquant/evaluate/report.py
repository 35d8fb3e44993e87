"""The size-vs-quality plot of one or more results.json files.

Two panels: bits per weight (or file size) against mean KLD and against perplexity. One
labelled point per file type; the Pareto front (nothing both smaller and better) drawn as a
line through its points; an optional "unpruned" series (the unpruned model's results) in
another colour, to separate what pruning cost from what quantization cost.

Example::

    plot_report([read_results("results.json")], "report.png",
                unpruned=read_results("unpruned.json"))
"""

from __future__ import annotations

from pathlib import Path

from shortquant.errors import EvalError

X_AXES = {"bpw": ("bits per weight", lambda f: f.get("bpw")),
          "size": ("file size (GiB)", lambda f: f["bytes"] / (1 << 30))}
Y_AXES = {"kld": ("mean KL divergence vs base", lambda f: (f.get("kld") or {}).get("mean")),
          "ppl": ("perplexity", lambda f: f.get("ppl"))}


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


def _files_of(data: dict) -> list[dict]:
    """The files of one results.json; the base itself is left out of the KLD panel (KLD ~ 0)."""
    base = (data.get("settings") or {}).get("base")
    out = []
    for f in data["files"]:
        if base and f.get("path") == base and f.get("kld"):
            f = dict(f, kld=None)
        out.append(f)
    return out


def plot_report(results: list[dict], output: str | Path, *, unpruned: dict | None = None,
                x_axis: str = "bpw", title: str | None = None) -> Path:
    """Draw the report PNG (or PDF/SVG by suffix) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = [f for data in results for f in _files_of(data)]
    unpruned_files = _files_of(unpruned) if unpruned else []
    x_label, x_of = X_AXES[x_axis]
    panels = [key for key, (_, y_of) in Y_AXES.items()
              if _series(files, x_of, y_of) or _series(unpruned_files, x_of, y_of)]
    if not panels:
        raise EvalError("nothing to plot: the results have neither KLD nor perplexity values")

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        y_label, y_of = Y_AXES[key]
        groups = [("pruned" if unpruned else "files", files, "tab:blue", "o")]
        if unpruned:
            groups.append(("unpruned", unpruned_files, "tab:orange", "s"))
        for name, group, color, marker in groups:
            points = _series(group, x_of, y_of)
            if not points:
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.scatter(xs, ys, color=color, marker=marker, label=name, zorder=3)
            for x, y, label in points:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            front = pareto_front([(x, y) for x, y, _ in points])
            ax.plot([xs[i] for i in front], [ys[i] for i in front], color=color, linestyle="--",
                    linewidth=1, label=f"{name} Pareto front", zorder=2)
        if key == "kld" and all(y > 0 for f in files + unpruned_files
                                for y in [y_of(f)] if y is not None):
            ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "size vs quality")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
