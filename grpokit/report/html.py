"""The HTML run report: `write_report(run_dir)` -> `run_dir/report.html`, one self-contained page.

Reads the run directory (docs/interfaces.md, "Run directory"): config.toml, metrics.jsonl,
samples.jsonl, eval.json; any of them may be missing (a run in progress, a run without evaluation)
and the page says so instead of failing. The page needs no network and runs no script: CSS is inline,
curves are inline SVG (`grpokit.report.charts`), collapsible blocks are <details>. A half-written
last line of a .jsonl (the trainer is still writing) is skipped.

Sections: run summary (final metrics, eval.json before/after with 95% CIs, config.toml collapsed),
training curves, and sample completions with a per-token credit heatmap.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from grpokit.report.charts import PALETTE, Series, chart

REPORT_NAME = "report.html"
REPORT_MODE = 0o644  # readable by a web server / a colleague, like a normally created file
# How many logged samples the page shows (latest steps first).
MAX_SAMPLES = 6
# Final-value summary: mean over this many last logged steps.
SUMMARY_LAST_STEPS = 10
# Heatmap colours (RGB): negative credit red, positive blue; alpha = |credit| / max |credit| * MAX_ALPHA.
NEG_RGB = (214, 39, 40)
POS_RGB = (31, 119, 180)
MAX_ALPHA = 0.85

SUMMARY_KEYS = ("loss", "eval/loss", "reward/mean", "acc", "len/median", "truncation_rate", "entropy", "kl_ref", "grad_norm")
TIME_KEYS = ("time/rollout", "time/reward", "time/logprobs", "time/update")


# ----------------------------------------------------------------------------- reading the run dir


@dataclass
class JsonlFile:
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0  # blank-free lines that were not a JSON object (e.g. a half-written last line)
    exists: bool = False


def read_jsonl(path: Path) -> JsonlFile:
    """Every JSON-object line of `path`; unreadable lines are counted, not raised."""
    out = JsonlFile()
    if not path.is_file():
        return out
    out.exists = True
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                out.skipped += 1
                continue
            if isinstance(rec, dict):
                out.records.append(rec)
            else:
                out.skipped += 1
    return out


def _num(x: Any) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, bool, str)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps[N], values[N]) sorted by step, where `key` is a finite number; step defaults to line index.

    A step logged twice (a run resumed from a checkpoint re-logs the steps after it) keeps its last value.
    """
    by_step: dict[float, float] = {}
    for i, rec in enumerate(records):
        y = _num(rec.get(key))
        if y is None:
            continue
        step = _num(rec.get("step"))
        by_step[float(i) if step is None else step] = y
    xs = sorted(by_step)
    return np.asarray(xs, dtype=np.float64), np.asarray([by_step[x] for x in xs], dtype=np.float64)


# ----------------------------------------------------------------------------- curves


@dataclass
class Panel:
    """One chart: `svg` markup plus the legend entries (label, colour, dashed)."""

    id: str
    title: str
    keys: list[str]
    svg: str
    legend: list[tuple[str, str, bool]]


def _panel(pid: str, title: str, series: list[Series], *, logy: bool = False) -> Panel | None:
    if not series:
        return None
    svg = chart(series, logy=logy, label=title)
    legend = list({(s.label, s.color, s.dashed): None for s in series if s.kind != "band"})
    return Panel(pid, title, list(dict.fromkeys(s.label for s in series)), svg, legend)


def _lines_panel(records, pid: str, title: str, keys: Sequence[str], *, logy: bool = False) -> Panel | None:
    series = []
    for k in keys:
        x, y = _series(records, k)
        if len(x):
            series.append(Series(k, x, y, PALETTE[len(series) % len(PALETTE)]))
    return _panel(pid, title, series, logy=logy)


def _length_panel(records) -> Panel | None:
    """Median length with the q25-q75 band shaded, q25/q75 dotted edges, mean dashed."""
    have = {k: _series(records, k) for k in ("len/q25", "len/median", "len/q75", "len/mean")}
    have = {k: v for k, v in have.items() if len(v[0])}
    series = []
    if "len/q25" in have and "len/q75" in have:
        (x1, lo), (x2, hi) = have["len/q25"], have["len/q75"]
        common, i1, i2 = np.intersect1d(x1, x2, return_indices=True)
        series.append(Series("len/q25-q75", common, lo[i1], PALETTE[0], kind="band", y2=hi[i2]))
    for k, color, dashed in (("len/q25", PALETTE[0], True), ("len/median", PALETTE[0], False),
                             ("len/q75", PALETTE[0], True), ("len/mean", PALETTE[1], True)):
        if k in have:
            series.append(Series(k, *have[k], color, dashed=dashed, smooth=k in ("len/median", "len/mean")))
    return _panel("plot-length", "Response length (tokens)", series)


def _time_panel(records) -> Panel | None:
    """Step time split into phases, stacked; time/step (if logged) drawn on top as the total."""
    series = []
    for k in TIME_KEYS:
        x, y = _series(records, k)
        if len(x):
            series.append(Series(k, x, y, PALETTE[len(series)], kind="area"))
    x, y = _series(records, "time/step")
    if len(x):
        series.append(Series("time/step", x, y, "#222222", smooth=False))
    return _panel("plot-time", "Step time (s), stacked by phase", series)


def build_panels(records: Sequence[dict[str, Any]]) -> list[Panel]:
    """Every curve panel the logged keys allow, in reading order; absent keys are silently skipped."""
    keys = set().union(*(r.keys() for r in records)) if records else set()
    per_fn = sorted(k for k in keys if k.startswith("reward/") and k.endswith("/mean") and k != "reward/mean")
    specs: list[Panel | None] = [
        _lines_panel(records, "plot-loss", "Loss (eval/loss: held-out)", ["loss", "eval/loss"]),
        _lines_panel(records, "plot-reward", "Reward (mean; per reward function)", ["reward/mean", *per_fn]),
        _lines_panel(records, "plot-acc", "Accuracy", ["acc", "frac_zero_var_groups"]),
        _length_panel(records),
        _lines_panel(records, "plot-truncation", "Truncation rate", ["truncation_rate"]),
        _lines_panel(records, "plot-entropy", "Entropy", ["entropy"]),
        _lines_panel(records, "plot-kl_ref", "KL to reference", ["kl_ref"]),
        _lines_panel(records, "plot-ppo_kl", "PPO KL (old vs current policy)", ["ppo_kl"]),
        _lines_panel(records, "plot-clip", "Clipped token fractions", ["clip/low", "clip/high", "clip/dual"]),
    ]
    specs += [  # sampler vs trainer log-probs and the rollout correction (SPEC 12)
        _lines_panel(records, "plot-mismatch", "Sampler vs trainer log-probs (μ − ℓ°)", ["mismatch/k1", "mismatch/k3", "mismatch/abs_max"]),
        _lines_panel(records, "plot-correction-weight", "Rollout correction: IS weight",
                     ["correction/weight/mean", "correction/weight/min", "correction/weight/max"]),
        _lines_panel(records, "plot-correction-masked", "Rollout correction: fractions masked / truncated",
                     ["correction/masked_tokens", "correction/masked_seqs", "correction/truncated_tokens", "correction/truncated_seqs"]),
    ]
    for prefix in ("fipo/", "frpo/"):
        for k in sorted(k for k in keys if k.startswith(prefix)):
            specs.append(_lines_panel(records, "plot-" + k.replace("/", "-"), k, [k]))
    specs += [
        _lines_panel(records, "plot-grad_norm", "Gradient norm (log scale)", ["grad_norm"], logy=True),
        _lines_panel(records, "plot-lr", "Learning rate", ["lr"]),
        _lines_panel(records, "plot-tokens", "Tokens per step", ["tokens/completion", "tokens/total"]),
        _time_panel(records),
    ]
    return [p for p in specs if p is not None]


# ----------------------------------------------------------------------------- heatmap


def credit_color(value: float, scale: float) -> str:
    """CSS background for one token: red (negative) / blue (positive), alpha = |value| / scale."""
    if scale <= 0 or not math.isfinite(value):
        return "transparent"
    a = min(1.0, abs(value) / scale) * MAX_ALPHA
    r, g, b = NEG_RGB if value < 0 else POS_RGB
    return f"rgba({r},{g},{b},{a:.3f})"


def credit_heatmap(tokens: Sequence[str], credit: Sequence[float | None]) -> str:
    """One <span> per token, coloured by its credit, scaled by this sample's max |credit|.

    The title attribute holds the exact value (repr of the float); text is HTML-escaped and the
    container preserves whitespace and newlines.
    """
    vals = [_num(c) for c in credit]
    finite = [abs(v) for v in vals if v is not None]
    scale = max(finite) if finite else 0.0
    spans = []
    for tok, v in zip(tokens, vals):
        title = "nan" if v is None else repr(v)
        bg = "transparent" if v is None else credit_color(v, scale)
        spans.append(f'<span class="t" style="background:{bg}" title="{title}">{html.escape(str(tok))}</span>')
    return "".join(spans)


# ----------------------------------------------------------------------------- page sections


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "-" if x is None else _esc(x)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4g}" if not float(v).is_integer() else str(int(v))


def _summary_section(run_dir: Path, metrics: JsonlFile) -> str:
    recs = metrics.records
    rows = [("run", _esc(run_dir.resolve().name)), ("directory", _esc(run_dir.resolve()))]
    if not metrics.exists:
        rows.append(("metrics.jsonl", "not found: no training steps logged yet"))
    else:
        steps = [s for s in (_num(r.get("step")) for r in recs) if s is not None]
        n_steps = len(set(steps)) if steps else len(recs)
        rows.append(("steps logged", f"{n_steps}" + (f" (last step {_fmt(max(steps))})" if steps else "")))
        total = _series(recs, "time/step")[1]
        if len(total):
            rows.append(("training time", f"{total.sum() / 60:.1f} min ({total.mean():.2f} s/step)"))
        for k in SUMMARY_KEYS:
            _, y = _series(recs, k)
            if len(y):
                n = min(SUMMARY_LAST_STEPS, len(y))
                rows.append((f"{k} (mean of last {n})", _fmt(y[-n:].mean())))
        if metrics.skipped:
            rows.append(("note", f"{metrics.skipped} unreadable line(s) of metrics.jsonl skipped"))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _ci_of(res: dict[str, Any], key: str) -> list[float] | None:
    ci = res.get("ci")
    if isinstance(ci, dict):
        for name in ([key, "avg@k"] if key == "acc" else [key]):
            v = ci.get(name)
            if isinstance(v, (list, tuple)) and len(v) == 2 and all(_num(x) is not None for x in v):
                return [float(v[0]), float(v[1])]
    v = res.get(f"{key}_ci")
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_num(x) is not None for x in v):
        return [float(v[0]), float(v[1])]
    return None


def _eval_rows(res: dict[str, Any]) -> dict[str, tuple[float, list[float] | None]]:
    """metric -> (value, ci) for one side of eval.json: accuracy first, then pass@k, cons@k, lengths."""
    k = res.get("k")
    out: dict[str, tuple[float, list[float] | None]] = {}
    acc = _num(res.get("acc", res.get("avg@k")))
    if acc is not None:
        out[f"accuracy (avg@{k})" if k is not None else "accuracy"] = (acc, _ci_of(res, "acc"))
    pk = res.get("pass@k")
    if isinstance(pk, dict):
        for kk, v in sorted(pk.items(), key=lambda kv: str(kv[0]).zfill(8)):
            if _num(v) is not None:
                out[f"pass@{kk}"] = (float(v), _ci_of(res, f"pass@{kk}"))
    if _num(res.get("cons@k")) is not None:
        out[f"cons@{k}" if k is not None else "cons@k"] = (float(res["cons@k"]), _ci_of(res, "cons@k"))
    ls = res.get("length")
    if isinstance(ls, dict):
        for name in ("median", "mean", "truncation_rate"):
            if _num(ls.get(name)) is not None:
                out[f"length {name}" if name != "truncation_rate" else "truncation rate"] = (float(ls[name]), None)
    for name in ("n", "k"):
        if _num(res.get(name)) is not None:
            out[name] = (float(res[name]), None)
    shown = {"acc", "avg@k", "pass@k", "cons@k", "length", "n", "k", "ci", "time_s"}
    for name, v in res.items():  # anything else numeric the evaluator chose to log
        if name not in shown and _num(v) is not None:
            out[name] = (float(v), None)
    return out


def _eval_section(run_dir: Path) -> str:
    path = run_dir / "eval.json"
    if not path.is_file():
        return '<p class="muted">No eval.json: this run has no held-out evaluation (yet).</p>'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f'<p class="warn">eval.json could not be read ({_esc(e)}); rerun the evaluation.</p>'
    sides = [s for s in ("before", "after") if isinstance(data.get(s), dict)]
    sides += [s for s, v in data.items() if isinstance(v, dict) and s not in sides]
    if not sides:
        return '<p class="muted">eval.json holds no held-out results (no held-out set was evaluated).</p>'
    tables = {s: _eval_rows(data[s]) for s in sides}
    metrics = list(dict.fromkeys(m for s in sides for m in tables[s]))
    delta = sides[:2] == ["before", "after"]
    head = "".join(f"<th>{_esc(s)}</th>" for s in sides) + ("<th>change</th>" if delta else "")
    body = []
    for m in metrics:
        cells = []
        for s in sides:
            if m not in tables[s]:
                cells.append("<td>-</td>")
                continue
            v, ci = tables[s][m]
            ci_txt = f' <span class="ci">[{_fmt(ci[0])}, {_fmt(ci[1])}]</span>' if ci else ""
            cells.append(f"<td>{_fmt(v)}{ci_txt}</td>")
        if delta:
            a, b = tables["before"].get(m), tables["after"].get(m)
            if a is None or b is None or m in ("n", "k"):
                cells.append("<td></td>")
            else:
                d = b[0] - a[0]
                is_acc = m.startswith(("accuracy", "pass@", "cons@"))
                cls = ("pos" if d > 0 else "neg" if d < 0 else "") if is_acc else ""
                cells.append(f'<td class="{cls}">{d:+.4g}</td>')
        body.append(f"<tr><th>{_esc(m)}</th>{''.join(cells)}</tr>")
    return (
        f'<table class="grid"><tr><th>held-out metric</th>{head}</tr>{"".join(body)}</table>'
        '<p class="muted">Brackets: 95% bootstrap confidence interval over problems.</p>'
    )


def _config_section(run_dir: Path) -> str:
    path = run_dir / "config.toml"
    if not path.is_file():
        return '<p class="muted">No config.toml.</p>'
    text = path.read_text(encoding="utf-8", errors="replace")
    return f"<details><summary>config.toml ({len(text.splitlines())} lines)</summary><pre>{_esc(text)}</pre></details>"


def _curves_section(metrics: JsonlFile) -> str:
    if not metrics.records:
        return '<p class="muted">No metrics logged yet (metrics.jsonl is missing or empty).</p>'
    panels = build_panels(metrics.records)
    if not panels:
        return '<p class="muted">metrics.jsonl has none of the plotted keys.</p>'
    figs = "".join(
        f'<figure class="card" id="{p.id}"><figcaption>{_esc(p.title)}</figcaption>{p.svg}'
        f'<div class="keys">{"".join(_legend_item(*item) for item in p.legend)}</div></figure>'
        for p in panels
    )
    return f'<div class="cards">{figs}</div>'


def _legend_item(label: str, color: str, dashed: bool) -> str:
    style = f"border-top: 2px {'dashed' if dashed else 'solid'} {color}"
    return f'<span class="key"><span class="sw" style="{style}"></span>{_esc(label)}</span>'


def select_samples(records: Sequence[dict[str, Any]], limit: int = MAX_SAMPLES) -> list[dict[str, Any]]:
    """The `limit` samples of the latest steps, latest first (file order within a step)."""
    order = sorted(range(len(records)), key=lambda i: (-(_num(records[i].get("step")) or 0.0), i))
    return [records[i] for i in order[:limit]]


def _sample_card(rec: dict[str, Any]) -> str:
    tokens, credit = rec.get("tokens"), rec.get("credit")
    head = [f"step {_fmt(rec.get('step'))}"]
    if _num(rec.get("reward")) is not None:
        head.append(f"reward {_fmt(rec['reward'])}")
    note = ""
    if isinstance(tokens, list) and isinstance(credit, list) and tokens:
        if len(tokens) != len(credit):
            n = min(len(tokens), len(credit))
            note = f'<p class="warn">{len(tokens)} tokens but {len(credit)} credit values; showing the first {n}.</p>'
        finite = [abs(v) for v in map(_num, credit) if v is not None]
        scale = max(finite) if finite else 0.0
        head.append(f"{len(tokens)} tokens, max |credit| {_fmt(scale)}")
        body = f'<div class="heat">{credit_heatmap(tokens, credit)}</div>'
    else:
        note = '<p class="muted">No per-token credit logged for this sample.</p>'
        body = f'<div class="heat">{_esc(rec.get("completion", ""))}</div>'
    prompt = _esc(rec.get("prompt", ""))
    return (
        f'<div class="sample"><div class="shead">{" · ".join(head)}</div>'
        f"<details><summary>prompt</summary><pre>{prompt}</pre></details>{note}{body}</div>"
    )


def _samples_section(samples: JsonlFile) -> str:
    if not samples.records:
        return '<p class="muted">No samples logged yet (samples.jsonl is missing or empty).</p>'
    legend = (
        '<div class="legend"><span>negative credit</span><span class="bar"></span><span>positive credit</span>'
        '<span class="muted">each sample is scaled by its own max |credit|; '
        "hover a token for its exact value</span></div>"
    )
    return legend + "".join(_sample_card(r) for r in select_samples(samples.records))


CSS = f"""
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px;
  padding: 16px 24px 48px; color: #1d1d1f; background: #fff; }}
h1 {{ font-size: 22px; margin: 8px 0 4px; }}
h2 {{ font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }}
nav a {{ margin-right: 14px; color: #1f5fa8; }}
table {{ border-collapse: collapse; margin: 6px 0; }}
th, td {{ padding: 3px 10px; text-align: left; border-bottom: 1px solid #eee; font-variant-numeric: tabular-nums; }}
table.kv th {{ color: #555; font-weight: 500; }}
table.grid th:first-child {{ color: #555; font-weight: 500; }}
td.pos {{ color: #1a7f37; }} td.neg {{ color: #b42318; }} .ci {{ color: #777; font-size: 12px; }}
.muted {{ color: #777; }} .warn {{ color: #b42318; }}
pre {{ background: #f6f8fa; padding: 8px; overflow-x: auto; font-size: 12px; white-space: pre-wrap; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 10px; }}
.card {{ margin: 0; border: 1px solid #e5e5e5; border-radius: 6px; padding: 4px; background: #fff; }}
.card figcaption {{ font-weight: 600; font-size: 13px; padding: 2px 4px; }}
.chart {{ width: 100%; height: auto; display: block; font: 11px system-ui, sans-serif; fill: #444; }}
.chart .xl {{ fill: #666; }}
.keys {{ font-size: 11px; color: #444; padding: 0 4px 2px; }}
.key {{ margin-right: 12px; white-space: nowrap; }}
.sw {{ display: inline-block; width: 18px; vertical-align: middle; margin-right: 4px; }}
.sample {{ border: 1px solid #e5e5e5; border-radius: 6px; padding: 8px 10px; margin: 10px 0; }}
.shead {{ font-weight: 600; margin-bottom: 4px; }}
.heat {{ font: 13px/1.7 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap;
  word-break: break-word; }}
.heat .t {{ border-radius: 2px; }}
.legend {{ display: flex; gap: 10px; align-items: center; font-size: 12px; flex-wrap: wrap; }}
.legend .bar {{ display: inline-block; width: 180px; height: 12px; border: 1px solid #ccc;
  background: linear-gradient(to right, rgba({",".join(map(str, NEG_RGB))},{MAX_ALPHA}), #fff,
  rgba({",".join(map(str, POS_RGB))},{MAX_ALPHA})); }}
"""


def render_report(run_dir: str | os.PathLike) -> str:
    """The report page for `run_dir` as an HTML string (see `write_report`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run directory '{run_dir}' does not exist; pass the directory `grpokit train` wrote "
            "(the one holding config.toml and metrics.jsonl)"
        )
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    samples = read_jsonl(run_dir / "samples.jsonl")
    title = f"grpokit run report: {run_dir.resolve().name}"
    now = _dt.datetime.now().isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{CSS}</style></head>
<body>
<h1>{_esc(title)}</h1>
<p class="muted">Generated {now} by grpokit.report.</p>
<nav><a href="#summary">Summary</a><a href="#curves">Training curves</a><a href="#samples">Samples</a></nav>
<h2 id="summary">Run summary</h2>
{_summary_section(run_dir, metrics)}
{_eval_section(run_dir)}
{_config_section(run_dir)}
<h2 id="curves">Training curves</h2>
{_curves_section(metrics)}
<h2 id="samples">Sample completions (latest steps first)</h2>
{_samples_section(samples)}
</body></html>
"""


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write `run_dir/report.html` (atomically, so a viewer never sees half a page) and return its path.
    A pipeline directory (`grpokit pipeline`) gets the report across its stages (grpokit.report.pipeline)."""
    run_dir = Path(run_dir)
    from grpokit.report.pipeline import is_pipeline_dir, render_pipeline_report

    page = render_pipeline_report(run_dir) if is_pipeline_dir(run_dir) else render_report(run_dir)
    out = run_dir / REPORT_NAME
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{REPORT_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, REPORT_MODE)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def main(run_dir: str | os.PathLike) -> int:
    """`grpokit report RUN_DIR`: write the report, print its path; returns a process exit code."""
    try:
        path = write_report(run_dir)
    except FileNotFoundError as e:
        print(f"grpokit report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
