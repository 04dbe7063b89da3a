"""grpokit.report.charts: ticks, smoothing, decimation, and the SVG it emits."""
from __future__ import annotations

import re

import numpy as np
import pytest

from grpokit.report.charts import MAX_BUCKETS, SMOOTH_FRACTION, Series, chart, decimate, fmt_tick, nice_ticks, smooth


def polylines(svg: str) -> list[list[tuple[float, float]]]:
    found = re.findall(r'<polyline[^>]* points="([^"]+)"', svg)
    return [[tuple(map(float, p.split(","))) for p in pts.split()] for pts in found]


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 1, 6) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(1, 20, 6) == [5, 10, 15, 20]
    assert nice_ticks(-0.013, 0.04, 6) == pytest.approx([-0.01, 0, 0.01, 0.02, 0.03, 0.04])
    t = nice_ticks(3e-7, 1.05e-6, 5)
    assert t == pytest.approx([4e-7, 6e-7, 8e-7, 1e-6])
    assert nice_ticks(2.0, 2.0) == [2.0]
    assert [fmt_tick(v) for v in (0, 1e-6, 2.5e-7, 0.05, 1234, 2e5)] == ["0", "1e-6", "2.5e-7", "0.05", "1234", "2e5"]


def test_smooth_is_a_trailing_mean():
    y = np.random.default_rng(0).normal(size=200)
    w = max(2, int(200 * SMOOTH_FRACTION))
    naive = [y[max(0, i + 1 - w) : i + 1].mean() for i in range(200)]
    assert smooth(y) == pytest.approx(naive, abs=1e-12)


def test_decimate_keeps_the_envelope_and_bounds_points():
    x = np.arange(10_000, dtype=float)
    y = np.sin(x / 50) + (x == 4321) * 5.0  # one spike must survive
    dx, dy = decimate(x, y)
    assert len(dx) <= 2 * MAX_BUCKETS and np.all(np.diff(dx) > 0)
    assert dy.max() == y.max() and dy.min() == y.min() and 4321 in dx
    sx, sy = decimate(x[:100], y[:100])  # short series untouched
    assert np.array_equal(sx, x[:100]) and np.array_equal(sy, y[:100])


def test_chart_long_run_draws_raw_and_smoothed_lines():
    x = np.arange(1, 5001, dtype=float)
    y = np.random.default_rng(1).random(5000)
    svg = chart([Series("reward/mean", x, y, "#1f77b4")])
    raw, smoothed = polylines(svg)
    assert 'stroke-opacity="0.3"' in svg  # faint raw line under the moving average
    assert len(raw) <= 2 * MAX_BUCKETS and len(smoothed) <= 2 * MAX_BUCKETS
    assert np.std([p[1] for p in smoothed]) < np.std([p[1] for p in raw]) / 3
    assert len(svg) < 60_000  # bounded page size however long the run
    assert svg.startswith('<svg class="chart" viewBox=') and svg.endswith("</svg>") and "http" not in svg


def test_chart_edge_cases():
    one = chart([Series("lr", np.array([3.0]), np.array([1e-6]), "#000")])
    assert "<circle" in one and "<polyline" not in one  # a single logged step is a dot
    flat = chart([Series("c", np.arange(5.0), np.zeros(5), "#000")])
    assert len(polylines(flat)[0]) == 5
    # log scale only when every value is positive; otherwise a linear axis rather than a crash
    pos = chart([Series("g", np.arange(1.0, 4.0), np.array([0.1, 1.0, 10.0]), "#000")], logy=True)
    ys = [p[1] for p in polylines(pos)[0]]
    assert ys[0] - ys[1] == pytest.approx(ys[1] - ys[2], abs=0.2)  # equal steps per decade
    lin = chart([Series("g", np.arange(1.0, 4.0), np.array([0.0, 1.0, 10.0]), "#000")], logy=True)
    ys = [p[1] for p in polylines(lin)[0]]
    assert (ys[0] - ys[1]) * 5 < ys[1] - ys[2]
