"""The HTML report of a pipeline directory (`grpokit pipeline`, SPEC 10): `write_report(PIPE)` dispatches here
when PIPE holds a pipeline's summary.json. One self-contained page: the stage table (one row per model state:
held-out accuracy with its 95% bootstrap interval, mean length, format and truncation rates), the stages
(kind, the model each read, time), any eval stages, and each stage's training curves from its metrics.jsonl.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from grpokit.report.html import CSS, _curves_section, _esc, _fmt, read_jsonl

__all__ = ["is_pipeline_dir", "render_pipeline_report"]


def is_pipeline_dir(path: str | Path) -> bool:
    """True when `path` holds a pipeline summary (summary.json with kind = 'pipeline')."""
    f = Path(path) / "summary.json"
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text()).get("kind") == "pipeline"
    except (json.JSONDecodeError, AttributeError):
        return False


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="kv"><tr>{head}</tr>{body}</table>'


def _acc(r: dict[str, Any]) -> str:
    lo, hi = r["ci"]
    return f"{r['acc']:.3f} [{lo:.3f}, {hi:.3f}]"


def render_pipeline_report(pipe_dir: str | Path) -> str:
    pipe = Path(pipe_dir)
    s = json.loads((pipe / "summary.json").read_text())
    e = s["eval"]
    title = f"grpokit pipeline report: {s['recipe']} ({pipe.resolve().name})"
    rows = _table(["model", "stage", "held-out acc [95% CI]", "mean length", "format rate", "truncation rate"],
                  [[_esc(r["model"]), _esc(r["stage"]), _acc(r), _fmt(r["length"]), _fmt(r["format_rate"]),
                    _fmt(r["truncation_rate"])] for r in s["rows"]])
    stages = _table(["#", "stage", "kind", "reads", "status", "seconds"],
                    [[st["index"] + 1, _esc(st["name"]), _esc(st["kind"]), _esc(st["model_in"] or "-"), _esc(st["status"]),
                     _fmt(round(st["seconds"])) if st.get("seconds") is not None else "-"] for st in s["stages"]])
    evals = ""
    if s.get("evals"):
        evals = "<h2>Eval stages</h2>" + _table(
            ["stage", "model", "k", "avg@k [95% CI]", "pass@k", "cons@k", "mean length"],
            [[_esc(x["stage"]), _esc(x["model"]), x["k"], _acc(x), _fmt(x["pass@k"]), _fmt(x["cons@k"]), _fmt(x["length"])]
             for x in s["evals"]])
    curves = []
    for st in s["stages"]:
        metrics = read_jsonl(pipe / st["dir"] / "metrics.jsonl")
        if metrics.records:
            section = _curves_section(metrics).replace('id="', f'id="{_esc(st["name"])}-')
            curves.append(f'<h3 id="stage-{_esc(st["name"])}">{st["index"] + 1}. {_esc(st["name"])} ({_esc(st["kind"])})</h3>{section}')
        elif (pipe / st["dir"] / "summary.json").is_file():  # a sample stage: its filter counts
            sm = json.loads((pipe / st["dir"] / "summary.json").read_text())
            counts = ", ".join(f"{k} {v}" for k, v in sm.get("removed", {}).items())
            curves.append(f'<h3>{st["index"] + 1}. {_esc(st["name"])} ({_esc(st["kind"])})</h3><p>generated '
                          f'{sm.get("generated")}, removed: {_esc(counts)}; kept {sm.get("kept")} '
                          f'(mean length {_fmt(sm.get("mean_length_kept"))})</p>')
    now = _dt.datetime.now().isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{CSS}</style></head>
<body>
<h1>{_esc(title)}</h1>
<p class="muted">Generated {now} by grpokit.report. Base model {_esc(s['base'])}; every model evaluated on the same
{e['n']} held-out problems of {_esc(e['task'])} ({_esc(e['how'])}, at most {e['max_new_tokens']} new tokens).</p>
<h2>Models</h2>
{rows}
<h2>Stages</h2>
{stages}
{evals}
<h2>Training curves</h2>
{''.join(curves) or '<p class="muted">No stage has logged metrics yet.</p>'}
</body></html>
"""
