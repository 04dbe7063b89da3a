"""Small inline-SVG line charts for the run report (no matplotlib: ~1 ms a chart instead of ~0.3 s).

`chart(series, ...)` returns one `<svg>` element (HTML5 inline SVG: no xmlns, no external reference)
drawing lines, shaded bands and stacked areas against the training step, with nice ticks and a grid.
The legend is left to the caller (HTML under the chart wraps better than SVG text).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np

WIDTH, HEIGHT = 520, 250
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 62, 14, 10, 34
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
# Longer series are decimated to this many (min, max) buckets per chart width, keeping the envelope.
MAX_BUCKETS = 600
# Curves with more points than this get a trailing moving average drawn over the faint raw line.
SMOOTH_MIN_POINTS = 30
# Moving-average window as a fraction of the number of points.
SMOOTH_FRACTION = 0.04
# About this many ticks per axis.
Y_TICKS, X_TICKS = 6, 6
# Empty space added above and below the data, as a fraction of its range.
Y_PAD = 0.05


@dataclass
class Series:
    """One thing to draw. kind: "line", "band" (fill between y and y2) or "area" (one stacked layer).

    x: [N] steps, y: [N] values (finite); y2: [N] the band's upper edge.
    """

    label: str
    x: np.ndarray
    y: np.ndarray
    color: str
    kind: str = "line"
    y2: np.ndarray | None = None
    dashed: bool = False
    smooth: bool = True


def smooth(y: np.ndarray) -> np.ndarray:
    """Trailing moving average over a window of SMOOTH_FRACTION of the points (shorter at the start)."""
    w = max(2, int(len(y) * SMOOTH_FRACTION))
    c = np.concatenate([[0.0], np.cumsum(y)])  # [N+1]
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - w)
    return (c[i] - c[lo]) / (i - lo)


def decimate(x: np.ndarray, y: np.ndarray, buckets: int = MAX_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """At most 2 * buckets points: each bucket's min and max in step order (the visible envelope)."""
    if len(x) <= 2 * buckets:
        return x, y
    edges = np.linspace(0, len(x), buckets + 1).astype(int)
    keep = []
    for a, b in zip(edges[:-1], edges[1:]):
        i, j = a + int(np.argmin(y[a:b])), a + int(np.argmax(y[a:b]))
        keep += sorted({i, j})
    idx = np.asarray(keep)
    return x[idx], y[idx]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round-numbered ticks (1, 2, 2.5, 5 x 10^e steps) covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t = first + len(ticks) * step
    return ticks


def fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        m, e = f"{v:.1e}".split("e")
        return f"{m.rstrip('0').rstrip('.')}e{int(e)}"
    return f"{v:.4g}"


def _pts(px: np.ndarray, py: np.ndarray) -> str:
    return " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px, py))


def _polygon(cls: str, points: str, s: Series, *, opacity: float) -> str:
    return (
        f'<polygon class="{cls}" points="{points}" fill="{s.color}" fill-opacity="{opacity}">'
        f"<title>{html.escape(s.label)}</title></polygon>"
    )


def chart(series: list[Series], *, logy: bool = False, xlabel: str = "step", label: str = "") -> str:
    """One inline <svg> of all `series` on shared axes. Stacked "area" layers stack in list order."""
    areas = [s for s in series if s.kind == "area"]
    stacked: list[tuple[Series, np.ndarray, np.ndarray, np.ndarray]] = []  # (layer, steps, bottom, top)
    if areas:  # stack: every layer on the union of steps, a missing step counting 0
        steps = np.unique(np.concatenate([s.x for s in areas]))  # [S]
        base = np.zeros(len(steps))
        stacked = []
        for s in areas:
            v = np.zeros(len(steps))
            v[np.searchsorted(steps, s.x)] = s.y
            stacked.append((s, steps, base.copy(), base + v))
            base = base + v
    ys = [s.y for s in series if s.kind != "area"] + [s.y2 for s in series if s.y2 is not None]
    if areas:
        ys += [top for *_, top in stacked] + [np.zeros(1)]
    yall = np.concatenate(ys)
    xall = np.concatenate([s.x for s in series])
    logy = logy and not areas and bool((yall > 0).all())
    tf = np.log10 if logy else (lambda a: np.asarray(a, dtype=np.float64))
    x0, x1 = float(xall.min()), float(xall.max())
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = float(tf(yall).min()), float(tf(yall).max())
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    else:
        y0, y1 = y0 - Y_PAD * (y1 - y0), y1 + Y_PAD * (y1 - y0)
    if areas:
        y0 = 0.0
    pw, ph = WIDTH - MARGIN_L - MARGIN_R, HEIGHT - MARGIN_T - MARGIN_B
    X = lambda x: MARGIN_L + (np.asarray(x, dtype=np.float64) - x0) / (x1 - x0) * pw  # noqa: E731
    Y = lambda y: MARGIN_T + (1 - (tf(y) - y0) / (y1 - y0)) * ph  # noqa: E731

    out = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{html.escape(label)}">']
    out.append(f'<rect x="{MARGIN_L}" y="{MARGIN_T}" width="{pw}" height="{ph}" fill="#fff" stroke="#bbb"/>')
    if logy:
        yt = [10.0 ** e for e in range(math.ceil(y0 - 1e-9), math.floor(y1 + 1e-9) + 1)] or [10 ** ((y0 + y1) / 2)]
    else:
        yt = [t for t in nice_ticks(y0, y1, Y_TICKS) if y0 <= t <= y1]
    for t in yt:
        py = float(Y(np.asarray([t]))[0])
        out.append(f'<line x1="{MARGIN_L}" x2="{MARGIN_L + pw}" y1="{py:.1f}" y2="{py:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{MARGIN_L - 5}" y="{py + 3.5:.1f}" text-anchor="end">{fmt_tick(t)}</text>')
    for t in nice_ticks(x0, x1, X_TICKS):
        if x0 <= t <= x1:
            px = float(X([t])[0])
            out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{MARGIN_T}" y2="{MARGIN_T + ph}" stroke="#eee"/>')
            out.append(f'<text x="{px:.1f}" y="{MARGIN_T + ph + 14}" text-anchor="middle">{fmt_tick(t)}</text>')
    out.append(
        f'<text x="{MARGIN_L + pw / 2}" y="{HEIGHT - 4}" text-anchor="middle" class="xl">{html.escape(xlabel)}</text>'
    )

    if areas:
        for s, xs, lo, hi in stacked:
            poly = _pts(np.concatenate([X(xs), X(xs)[::-1]]), np.concatenate([Y(hi), Y(lo)[::-1]]))
            out.append(_polygon("area", poly, s, opacity=0.75))
    for s in series:
        if s.kind == "band":
            poly = _pts(np.concatenate([X(s.x), X(s.x)[::-1]]), np.concatenate([Y(s.y), Y(s.y2)[::-1]]))
            out.append(_polygon("band", poly, s, opacity=0.22))
    for s in series:
        if s.kind != "line":
            continue
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        if len(s.x) == 1:
            out.append(f'<circle cx="{X(s.x)[0]:.1f}" cy="{Y(s.y)[0]:.1f}" r="3" fill="{s.color}"/>')
            continue
        lines = []
        if s.smooth and len(s.x) > SMOOTH_MIN_POINTS:
            lines.append((decimate(s.x, s.y), 1.0, 0.3))
            lines.append((decimate(s.x, smooth(s.y)), 1.7, 1.0))
        else:
            lines.append((decimate(s.x, s.y), 1.6, 1.0))
        for (x, y), w, op in lines:
            out.append(
                f'<polyline class="line" points="{_pts(X(x), Y(y))}" fill="none" stroke="{s.color}" '
                f'stroke-width="{w}" stroke-opacity="{op}"{dash}><title>{html.escape(s.label)}</title></polyline>'
            )
    out.append("</svg>")
    return "".join(out)
