"""Point labels that never overlap: a small deterministic placement for scatter plots.

Each label is tried at a fixed list of spots around its point (right, left, above, below, the
diagonals, then the same farther out with a thin leader line); the first spot whose box stays
inside the axes and touches no marker and no label placed before it wins. Labels are placed in
the order given, so the caller puts the most important ones first. The same points always give
the same picture.

Boxes are computed from the text's rendered size, so the layout of the figure (size, margins,
axis limits and scales) must be final before calling :func:`place_labels`.

Example::

    fig.canvas.draw()   # final layout first
    place_labels(ax, [(4.8, 0.03, "Q4_K_M"), (8.5, 0.0003, "Q8_0")])
"""

from __future__ import annotations

import math

from matplotlib.transforms import Bbox

# Offsets from the point, in points. Directions: (dx, dy) unit steps, tried in this order.
_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1),
               (2, 1), (-2, 1), (2, -1), (-2, -1), (1, 2), (-1, 2), (1, -2), (-1, -2))
_DISTANCES = (7, 13, 20, 30, 42, 56, 72, 90, 110, 135, 160)
_LEADER_FROM = 20     # labels at least this far (points) from their point get a leader line
_GAP_PX = 4.0         # minimum empty space between two labels, in pixels
_MARKER_GAP_PX = 1.0  # and between a label and a marker
_MARKER_RADIUS_PT = 3.5   # scatter's default marker is 6 points across


def _alignment(dx: int, dy: int) -> tuple[str, str]:
    ha = "left" if dx > 0 else "right" if dx < 0 else "center"
    va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
    return ha, va


def _box(anchor_x: float, anchor_y: float, width: float, height: float, ha: str, va: str) -> Bbox:
    x0 = {"left": anchor_x, "right": anchor_x - width, "center": anchor_x - width / 2}[ha]
    y0 = {"bottom": anchor_y, "top": anchor_y - height, "center": anchor_y - height / 2}[va]
    return Bbox.from_bounds(x0, y0, width, height)


def _overlaps(box: Bbox, other: Bbox, gap: float = _GAP_PX) -> bool:
    return box.padded(gap / 2).overlaps(other.padded(gap / 2))


def _segment_hits(box: Bbox, start: tuple[float, float], end: tuple[float, float]) -> bool:
    """True when the segment start-end passes through ``box`` (Liang-Barsky clipping)."""
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    low, high = 0.0, 1.0
    for p, q in ((-dx, x0 - box.x0), (dx, box.x1 - x0), (-dy, y0 - box.y0), (dy, box.y1 - y0)):
        if p == 0:
            if q < 0:
                return False
            continue
        t = q / p
        if p < 0:
            low = max(low, t)
        else:
            high = min(high, t)
        if low > high:
            return False
    return True


def _candidates():
    """(offset in points, alignment) in the order they are tried."""
    for distance in _DISTANCES:
        for dx, dy in _DIRECTIONS:
            norm = math.hypot(dx, dy)
            offset = (distance * dx / norm, distance * dy / norm)
            yield offset, _alignment(dx, dy)


def place_labels(ax, labels: list[tuple[float, float, str]], *, fontsize: float = 8,
                 color: str | list[str] = "black", obstacles: list[tuple[float, float]] = ()) -> list:
    """Annotate each (x, y, text) of ``labels`` in ``ax`` without overlaps; returns the annotations.

    ``obstacles`` are further data points (markers) labels must keep clear of; the labelled
    points themselves are always obstacles. A label with no free spot goes to the spot that
    clashes least, an overlap with another label counting most (never silently dropped).
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    colors = [color] * len(labels) if isinstance(color, str) else list(color)
    frame = ax.get_window_extent(renderer)
    radius = _MARKER_RADIUS_PT * px_per_pt
    markers = []
    for x, y in [(x, y) for x, y, _ in labels] + list(obstacles):
        px, py = ax.transData.transform((x, y))
        markers.append(Bbox.from_bounds(px - radius, py - radius, 2 * radius, 2 * radius))

    placed: list[Bbox] = []
    leaders: list[tuple[tuple[float, float], tuple[float, float]]] = []
    annotations = []
    for (x, y, text), text_color in zip(labels, colors):
        probe = ax.text(0, 0, text, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        px, py = ax.transData.transform((x, y))
        best = None
        for offset, (ha, va) in _candidates():
            box = _box(px + offset[0] * px_per_pt, py + offset[1] * px_per_pt, extent.width, extent.height, ha, va)
            inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1)
            if not inside:
                continue
            # matplotlib draws a leader from the label's centre (clipped at its box) to the point
            leader = ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2) if math.hypot(*offset) >= _LEADER_FROM else None
            leader = (leader, (px, py)) if leader else None
            # a label over another label is unreadable, a leader line through a label confusing,
            # a label over a marker only untidy
            clash = 100 * sum(1 for other in placed if _overlaps(box, other))
            clash += 10 * sum(1 for line in leaders if _segment_hits(box.padded(_GAP_PX), *line))
            if leader is not None:
                clash += 10 * sum(1 for other in placed if _segment_hits(other.padded(_GAP_PX), *leader))
            clash += sum(1 for other in markers if _overlaps(box, other, _MARKER_GAP_PX))
            if best is None or clash < best[0]:
                best = (clash, offset, ha, va, box)
            if clash == 0:
                break
        if best is None:   # nothing fits inside the axes: right of the point, clipped
            box = _box(px + 7 * px_per_pt, py, extent.width, extent.height, "left", "center")
            best = (0, (7, 0), "left", "center", box)
        _, offset, ha, va, box = best
        leader = math.hypot(*offset) >= _LEADER_FROM
        annotations.append(ax.annotate(
            text, (x, y), xytext=offset, textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
            color=text_color, zorder=4,
            arrowprops=dict(arrowstyle="-", color="0.6", linewidth=0.6, shrinkA=0, shrinkB=3) if leader else None))
        placed.append(box)
        if leader:
            leaders.append((((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2), (px, py)))
    return annotations
