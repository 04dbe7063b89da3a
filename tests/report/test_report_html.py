"""grpokit.report.html on a synthetic run directory, plus a headless-Chromium render check."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from grpokit.report.html import credit_color, main, read_jsonl, select_samples, write_report

STEPS = 20
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TRICKY_TOKEN = "<b>&amp;\"x'"  # must come out escaped, never as markup


def metrics_row(step: int) -> dict:
    t = step / STEPS
    return {
        "step": step,
        "reward/mean": 0.2 + 0.6 * t,
        "reward/numeric_match/mean": 0.1 + 0.7 * t,
        "reward/format/mean": 0.5 + 0.4 * t,
        "acc": 0.1 + 0.7 * t,
        "frac_zero_var_groups": 0.5 - 0.3 * t,
        "len/q25": 20 + 10 * t, "len/median": 30 + 15 * t, "len/q75": 45 + 20 * t, "len/mean": 33 + 15 * t,
        "truncation_rate": 0.1 * (1 - t),
        "entropy": 1.2 - 0.5 * t,
        "kl_ref": 0.01 * step,
        "ppo_kl": 1e-3 * (1 + math.sin(step)),
        "clip/low": 0.01, "clip/high": 0.02 + 0.001 * step, "clip/dual": 0.0,
        "fipo/weight_mean": 1.0 + 0.01 * step, "fipo/safety_reset": 0.05,
        "frpo/kl_to_go": 0.3 - 0.01 * step,
        "grad_norm": 2.0 / (1 + step),
        "lr": 1e-6 * min(1.0, step / 5),
        "time/rollout": 3.0, "time/reward": 0.2, "time/logprobs": 0.8, "time/update": 1.5, "time/step": 5.6,
    }


def sample_row(step: int, i: int) -> dict:
    tokens = ["Let", " me", " think", ".\n", "  2", " +", " 3", " =", " 5", "\n\n", TRICKY_TOKEN, "<|im_end|>"]
    credit = [0.5 - 0.1 * j + 0.01 * step + 0.001 * i for j in range(len(tokens))]
    return {"step": step, "prompt": f"What is 2+3? (step {step}, #{i})", "completion": "".join(tokens),
            "reward": float(i % 2), "tokens": tokens, "credit": credit}


def make_run(root: Path, *, eval_json: bool = True, config: bool = True, broken_tail: bool = True) -> Path:
    run = root / "run"
    run.mkdir()
    lines = [json.dumps(metrics_row(s)) for s in range(1, STEPS + 1)]
    tail = '\n{"step": 21, "reward/me' if broken_tail else "\n"  # a line the trainer is still writing
    (run / "metrics.jsonl").write_text("\n".join(lines) + tail)
    (run / "samples.jsonl").write_text(
        "".join(json.dumps(sample_row(s, i)) + "\n" for s in (5, 10, 15, 20) for i in range(2))
    )
    if eval_json:
        before = {
            "n": 100, "k": 4, "acc": 0.21, "avg@k": 0.21, "pass@k": {"1": 0.21, "4": 0.45}, "cons@k": 0.25,
            "ci": {"avg@k": [0.15, 0.28], "pass@1": [0.15, 0.28], "pass@4": [0.36, 0.55], "cons@k": [0.17, 0.34]},
            "length": {"min": 3, "q25": 20, "mean": 31, "median": 29, "q75": 40, "max": 128, "truncation_rate": 0.08},
        }
        after = {**before, "acc": 0.63, "avg@k": 0.63, "ci": {**before["ci"], "avg@k": [0.55, 0.71]}}
        (run / "eval.json").write_text(json.dumps({"before": before, "after": after}))
    if config:
        toml = '[model]\nname = "smollm2-135m"\n\n[algo]\nloss = "ppo_clip"\nclip_high = 0.28\n'
        (run / "config.toml").write_text(toml)
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    run = make_run(tmp_path_factory.mktemp("report"))
    path = write_report(run)
    return path, path.read_text(encoding="utf-8")


def figures(page: str) -> dict[str, str]:
    """figure id -> its markup."""
    return dict(re.findall(r'<figure class="card" id="([^"]+)">(.*?)</figure>', page, re.S))


def test_report_has_all_curves_as_inline_svg(report):
    path, page = report
    assert path.name == "report.html" and path.parent.name == "run"
    expected = ["plot-reward", "plot-acc", "plot-length", "plot-truncation", "plot-entropy", "plot-kl_ref",
                "plot-ppo_kl", "plot-clip", "plot-fipo-safety_reset", "plot-fipo-weight_mean",
                "plot-frpo-kl_to_go", "plot-grad_norm", "plot-lr", "plot-time"]
    figs = figures(page)
    assert list(figs) == expected
    for fid, fig in figs.items():
        assert fig.count('<svg class="chart"') == 1 and fig.count("</svg>") == 1, fid
        assert "<polyline" in fig or "<polygon" in fig, fid
    # one line per reward function next to the mean, each named in the legend
    reward = figs["plot-reward"]
    assert reward.count('<polyline class="line"') == 3
    for key in ("reward/mean", "reward/numeric_match/mean", "reward/format/mean"):
        assert f"</span>{key}</span>" in reward
    # 20 points: drawn raw (no smoothing yet), one vertex per step
    pts = re.search(r'<polyline class="line" points="([^"]+)"', figs["plot-acc"]).group(1).split()
    assert len(pts) == STEPS
    xs = [float(p.split(",")[0]) for p in pts]
    ys = [float(p.split(",")[1]) for p in pts]
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True)  # acc rises: SVG y goes down
    assert figs["plot-length"].count('class="band"') == 1  # the q25-q75 band
    assert figs["plot-time"].count('<polygon class="area"') == 4  # rollout/reward/logprobs/update stacked
    assert all(k in figs["plot-time"] for k in ("time/rollout", "time/reward", "time/logprobs", "time/update"))
    assert ">1e-6<" in figs["plot-lr"] or ">1e-7<" in figs["plot-lr"]  # small values get readable ticks


def test_report_is_self_contained(report):
    _, page = report
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|iframe)\b", page, re.I)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page)  # only data: URIs and anchors


def test_summary_eval_and_config(report):
    _, page = report
    assert "steps logged</th><td>20 (last step 20)" in page
    assert "1 unreadable line(s) of metrics.jsonl skipped" in page  # the half-written last line
    assert "0.21 <span class=\"ci\">[0.15, 0.28]</span>" in page  # before accuracy with its CI
    assert "0.63 <span class=\"ci\">[0.55, 0.71]</span>" in page  # after accuracy with its CI
    assert '<td class="pos">+0.42</td>' in page  # the change in accuracy
    assert "<details><summary>config.toml" in page and "name = &quot;smollm2-135m&quot;" in page


def test_credit_heatmap_spans(report):
    _, page = report
    shown = select_samples(read_jsonl(Path(report[0]).parent / "samples.jsonl").records)
    assert [s["step"] for s in shown] == [20, 20, 15, 15, 10, 10]  # latest steps first, a handful
    spans = re.findall(r'<span class="t" style="background:([^"]+)" title="([^"]+)">(.*?)</span>', page, re.S)
    assert len(spans) == len(shown) * 12
    first = shown[0]
    scale = max(abs(c) for c in first["credit"])
    for (bg, title, text), tok, c in zip(spans[:12], first["tokens"], first["credit"]):
        assert float(title) == c  # the exact value
        assert bg == credit_color(c, scale)
    # sign -> hue, |credit| / max|credit| -> alpha; the largest |credit| gets the full alpha
    assert credit_color(0.5, 0.5) == "rgba(31,119,180,0.850)" and credit_color(-0.25, 0.5) == "rgba(214,39,40,0.425)"
    assert credit_color(0.0, 0.5).endswith(",0.000)") and credit_color(1.0, 0.0) == "transparent"
    # whitespace and newlines kept verbatim inside a pre-wrap block; markup escaped
    texts = [t for _, _, t in spans[:12]]
    assert texts[3] == ".\n" and texts[4] == "  2" and texts[9] == "\n\n"
    assert texts[10] == "&lt;b&gt;&amp;amp;&quot;x&#x27;" and texts[11] == "&lt;|im_end|&gt;"
    assert TRICKY_TOKEN not in page
    assert "white-space: pre-wrap" in page


def test_missing_files_still_render(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    page = write_report(empty).read_text()
    assert "metrics.jsonl</th><td>not found" in page
    assert "No eval.json" in page and "No config.toml" in page and "No samples logged yet" in page
    run = make_run(tmp_path, eval_json=False, config=False, broken_tail=False)
    (run / "samples.jsonl").write_text(json.dumps({"step": 1, "prompt": "p", "completion": "a <i>b</i>"}) + "\n")
    page = write_report(run).read_text()
    assert "No eval.json" in page and len(figures(page)) == 14
    assert "a &lt;i&gt;b&lt;/i&gt;" in page and "No per-token credit logged" in page
    assert main(run) == 0 and capsys.readouterr().out.strip() == str(run / "report.html")
    assert main(tmp_path / "nope") == 2 and "does not exist" in capsys.readouterr().err


def test_partial_keys_only_plot_what_exists(tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    rows = [{"step": s, "reward/mean": s / 10, "lr": 1e-6, "time/rollout": 1.0, "unknown/key": 3} for s in range(5)]
    rows[2]["reward/mean"] = None  # a gap must not break the curve
    rows += [{"step": 3, "reward/mean": 0.9}, {"step": 4, "reward/mean": 0.95}]  # resumed at step 3
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    page = write_report(run).read_text()
    figs = figures(page)
    assert list(figs) == ["plot-reward", "plot-lr", "plot-time"]
    pts = re.search(r'<polyline class="line" points="([^"]+)"', figs["plot-reward"]).group(1).split()
    xs = [float(p.split(",")[0]) for p in pts]
    assert len(pts) == 4 and xs == sorted(xs)  # steps 0, 1, 3, 4 once each, in order
    assert "steps logged</th><td>5 (last step 4)" in page


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={cwd / 'profile'}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)


# Chromium's --enable-logging=stderr prints every console message (any level, uncaught errors, failed
# resource loads) as "INFO:CONSOLE:<line>] ..." (older builds: "CONSOLE(<line>)]").
CONSOLE = re.compile(r"CONSOLE[:(]\d+\)?\][^\n]*")
SENTINEL = "grpokit-report-rendered"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    path, page = report
    # The report has no script. A copy gets one console.log at the end of <body>: seeing it in the log
    # proves console capture works, and it must be the only console message (no errors, no failed loads).
    probe = tmp_path / "report_probe.html"
    probe.write_text(page.replace("</body>", f"<script>console.log('{SENTINEL}')</script></body>"), encoding="utf-8")
    shot = tmp_path / "report.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1200,2000", probe.as_uri(), cwd=tmp_path)
    assert shot.is_file(), proc.stderr[-2000:]
    messages = CONSOLE.findall(proc.stderr)
    assert any(SENTINEL in m for m in messages), f"console capture failed: {proc.stderr[-2000:]}"
    assert [m for m in messages if SENTINEL not in m] == []
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)  # [2000, 1200, C] floats in [0, 1]
    assert img.shape[:2] == (2000, 1200)
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not a single colour
    q = (rgb.reshape(-1, 3) * 255).astype(np.int64)  # [H*W, 3]
    assert len(np.unique(q[:, 0] << 16 | q[:, 1] << 8 | q[:, 2])) > 50  # distinct colours: text, charts
    # the chart area (below the summary) is drawn: coloured (non-grey) pixels exist in the lower half
    lower = rgb[1000:]
    assert ((lower.max(-1) - lower.min(-1)) > 0.3).mean() > 0.001
