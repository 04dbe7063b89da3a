"""`grpokit pipeline RECIPE`: run a list of stages, the DeepSeek-R1 recipe (SPEC 10; arXiv:2501.12948).

A pipeline recipe is a TOML file:

    recipe = "r1"
    [pipeline]
    base = "smollm2-135m"          # the model the first stage (and any `model = "base"`) reads
    dir = ""                       # '' = runs/<recipe>-<time>
    [eval]                         # the held-out evaluation after every model-producing stage (EvalConfig)
    format = "think_answer"
    data = { task = "add_trace", heldout_size = 100 }
    [[stages]]                     # kind = sft | rl | sample | eval (grpokit.pipeline.stages), plus the
    kind = "sft"                   # tables of that kind's own config ([stages.train], [stages.data], ...)
    model = "base"                 # which model it reads: "previous" (default), "base", a stage name, a path
    data = "previous"              # sft only: the dataset a sample stage wrote ("previous" or its name)

A string `model`/`data` is a link; a table is the config section. When a stage needs both (a link and a
[stages.data] table), write the link as `from = "base"` (model) and `dataset = "previous"` (data).

Each stage writes PIPE/<NN>-<name>/ and, when it has finished, a marker file there (written atomically);
`grpokit pipeline --resume PIPE` skips finished stages and continues an interrupted one from its newest
checkpoint. The runner evaluates the base model first and every model-producing stage's model after it
(greedy, the same held-out rows; cached in PIPE/evals/), and after every stage prints and saves the table
PIPE/summary.json and PIPE/summary.md: one row per model state, with held-out accuracy and its 95%
bootstrap interval, mean response length, format rate and truncation rate.

Overrides: `--set pipeline.base=...`, `--set eval.data.heldout_size=50`, `--set stages.1.train.steps=5`
(a stage by 0-based index or by name: `--set stages.grpo.train.steps=5`).
"""
from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpokit.config import ConfigError, _deep_update, _parse_value, parse_overrides, read_recipe
from grpokit.pipeline.stages import (
    DONE_MARKER, STAGES, EvalConfig, StageSpec, eval_row, evaluate_model, load_eval_config, stage_config, write_marker,
)

__all__ = ["PipelineConfig", "load_pipeline", "run_pipeline", "format_summary", "PIPELINE_FILE", "SUMMARY_FILE"]

#: The resolved recipe, saved in the pipeline directory (what `--resume DIR` reads back).
PIPELINE_FILE = "pipeline.json"
SUMMARY_FILE = "summary.json"
SUMMARY_MD = "summary.md"
TOP_KEYS = ("recipe", "pipeline", "eval", "stages")
PIPELINE_KEYS = ("base", "dir", "threads", "keep_checkpoints")
#: Keys of a `[[stages]]` entry that are links, not config tables (a string `model`/`data` is a link).
LINK_KEYS = ("kind", "name", "model", "data", "traces", "from", "dataset")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class PipelineConfig:
    recipe: str
    dir: Path
    base: str
    threads: int
    eval_table: dict[str, Any]          # the [eval] table (validated into `eval`)
    eval: EvalConfig
    stages: list[StageSpec]
    raw: dict[str, Any] = field(default_factory=dict)  # the whole resolved recipe (saved as pipeline.json)
    keep_checkpoints: bool = True       # false: a finished stage's checkpoints/ is deleted (its final/ stays)


# ---------------------------------------------------------------------------- loading

def _unknown(key: str, valid: tuple[str, ...], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown pipeline field '{where}{key}'{hint} (valid: {', '.join(valid)})")


def _apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """`stages.N.rest=v` / `stages.NAME.rest=v` edit one stage; anything else edits the top-level tables."""
    stages = data.setdefault("stages", [])
    plain = []
    for item in overrides:
        path = item.split("=", 1)[0].strip()
        if not path.startswith("stages."):
            plain.append(item)
            continue
        if "=" not in item or path.count(".") < 2:
            raise ConfigError(f"override '{item}' must look like stages.N.section.field=value (N: 0-based index or stage name)")
        _, which, rest = path.split(".", 2)
        names = [s.get("name", s.get("kind")) if isinstance(s, dict) else None for s in stages]
        if which.isdigit() and int(which) < len(stages):
            entry = stages[int(which)]
        elif which in names:
            entry = stages[names.index(which)]
        else:
            raise ConfigError(f"override '{item}': no stage '{which}' (give a 0-based index below {len(stages)} or one of: {', '.join(map(str, names))})")
        node = entry
        keys = rest.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = _parse_value(item.split("=", 1)[1].strip())
    _deep_update(data, parse_overrides(plain))


def load_pipeline(path: str | Path | None = None, overrides: list[str] | None = None, *,
                  data: dict[str, Any] | None = None, dir: str | Path | None = None) -> PipelineConfig:
    """Read a pipeline recipe (a TOML path, or `data`, its parsed tables), apply `--set` overrides and
    `dir`, and check it: every stage's kind, links and config (a misspelt field fails naming the stage)."""
    raw: dict[str, Any] = json.loads(json.dumps(data)) if data is not None else {}
    if path is not None:
        raw = read_recipe(path, kind="pipeline recipe", hint="bundled ones are in recipes/pipeline/ (e.g. r1)")
    _apply_overrides(raw, list(overrides or []))
    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown(key, TOP_KEYS, "")
    pipe = raw.setdefault("pipeline", {})
    for key in pipe:
        if key not in PIPELINE_KEYS:
            raise _unknown(key, PIPELINE_KEYS, "pipeline.")
    recipe = str(raw.get("recipe", "pipeline"))
    if dir is not None:
        pipe["dir"] = str(dir)
    if not pipe.get("dir"):
        pipe["dir"] = str(Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    base = str(pipe.get("base", "smollm2-135m"))
    eval_table = raw.get("eval", {})
    if not isinstance(eval_table, dict):
        raise ConfigError("'eval' must be a table: [eval] with data.task, data.heldout_size, rollout.max_new_tokens, ...")
    eval_cfg = load_eval_config(eval_table, where="eval")
    stages = _parse_stages(raw.get("stages"), eval_table)
    keep = pipe.get("keep_checkpoints", True)
    if not isinstance(keep, bool):
        raise ConfigError(f"pipeline.keep_checkpoints must be true or false, got {keep!r}")
    cfg = PipelineConfig(recipe=recipe, dir=Path(pipe["dir"]), base=base, threads=int(pipe.get("threads", 0)),
                         eval_table=eval_table, eval=eval_cfg, stages=stages, raw=raw, keep_checkpoints=keep)
    _check_links(cfg)
    return cfg


def _parse_stages(entries: Any, eval_table: dict[str, Any]) -> list[StageSpec]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError("a pipeline needs at least one [[stages]] entry (kind = sft, rl, sample or eval)")
    specs: list[StageSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"stages[{i}] must be a table ([[stages]] with kind = ...)")
        kind = entry.get("kind")
        if kind is None:
            raise ConfigError(f"stages[{i}] has no kind; set kind = one of {', '.join(STAGES.names())}")
        if kind not in STAGES:
            close = difflib.get_close_matches(str(kind), STAGES.names(), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"stages[{i}].kind = {kind!r} is not a stage kind{hint}; choose one of {', '.join(STAGES.names())}")
        name = str(entry.get("name", kind))
        if "name" not in entry and name in seen:
            name = f"{kind}-{i + 1}"
        if not NAME_RE.match(name) or name in ("base", "previous"):
            raise ConfigError(f"stages[{i}].name = {name!r}: use letters, digits, '-', '_' or '.', and not 'base' or 'previous'")
        if name in seen:
            raise ConfigError(f"stages[{i}].name = {name!r} is used twice; give each stage its own name")
        seen.add(name)
        settings = {k: v for k, v in entry.items() if k not in LINK_KEYS}
        for alias, key in (("from", "model"), ("dataset", "data")):
            if alias in entry:
                if isinstance(entry.get(key), str):
                    raise ConfigError(f"stages[{i}]: {alias} = {entry[alias]!r} and {key} = {entry[key]!r} are both links; give one")
                if not isinstance(entry[alias], str):
                    raise ConfigError(f"stages[{i}].{alias} must be a string (a stage name, 'previous', 'base' or a path)")
                if key in entry:
                    settings[key] = entry[key]
                entry = {**entry, key: entry[alias]}
        model = entry.get("model", "previous")
        if isinstance(model, dict):
            settings["model"], model = model, "previous"
        elif not isinstance(model, str):
            raise ConfigError(f"stages[{i}].model must be 'previous', 'base', a stage name or a path (or a [model] table)")
        data = entry.get("data", "")
        if isinstance(data, dict):
            settings["data"], data = data, ""
        elif not isinstance(data, str) or (data and kind != "sft"):
            raise ConfigError(f"stages[{i}].data = {data!r}: only an sft stage takes a dataset link ('previous' or a stage name); "
                              f"a {kind} stage's data is a table ([stages.data] task = ...)")
        traces = entry.get("traces", {})
        if traces and kind != "sft":
            raise ConfigError(f"stages[{i}].traces: only an sft stage generates traces")
        if not isinstance(traces, dict):
            raise ConfigError(f"stages[{i}].traces must be a table, e.g. {{ n = 1000, seed = 0, max_digits = 2 }}")
        if traces and data:
            raise ConfigError(f"stages[{i}]: set either data = {data!r} or traces, not both")
        specs.append(StageSpec(index=i, name=name, kind=kind, settings=settings, model=model, data=data,
                               traces=dict(traces), eval_defaults=eval_table))
    return specs


def _check_links(cfg: PipelineConfig) -> None:
    """Model and data links point at earlier stages; every stage's config loads (typos fail here, before
    any model is loaded)."""
    earlier: dict[str, StageSpec] = {}
    for s in cfg.stages:
        if s.model not in ("previous", "base") and s.model in {t.name for t in cfg.stages} and s.model not in earlier:
            raise ConfigError(f"stages[{s.index}].model = {s.model!r} names a later stage; a stage reads an earlier stage's model")
        if s.kind == "sft":
            producers = [t for t in earlier.values() if STAGES.get(t.kind).dataset]
            if s.data == "previous" and not producers:
                raise ConfigError(f"stages[{s.index}].data = 'previous' but no earlier stage writes a dataset (a sample stage does)")
            if s.data and s.data != "previous" and s.data in {t.name for t in cfg.stages}:
                if s.data not in earlier or not STAGES.get(earlier[s.data].kind).dataset:
                    raise ConfigError(f"stages[{s.index}].data = {s.data!r}: that stage does not write a dataset before this one")
        check = StageSpec(**{**s.__dict__, "data_path": "<data>" if (s.data or s.traces) else ""})
        stage_config(check, cfg.base, cfg.dir / _dirname(s))
        earlier[s.name] = s


def _dirname(spec: StageSpec) -> str:
    return f"{spec.index + 1:02d}-{spec.name}"


# ---------------------------------------------------------------------------- running

def _atomic_json(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _rel(path: Path | str, root: Path) -> str:
    """`path` relative to the pipeline directory when inside it (the directory can be moved), else as is."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _abs(stored: str, root: Path) -> Path:
    p = Path(stored)
    return p if p.is_absolute() or not (root / p).exists() else root / p


def _evaluate(cfg: PipelineConfig, label: str, model: Path) -> dict[str, Any]:
    """The held-out evaluation of `model`, cached in PIPE/evals/<label>.json (a resumed pipeline reuses it)."""
    from grpokit.report.evaluate import write_json

    out = cfg.dir / "evals" / f"{label}.json"
    if out.exists():
        cached = json.loads(out.read_text())
        if cached.get("model") == _rel(model, cfg.dir):
            return cached["result"]
    t = time.perf_counter()
    result = evaluate_model(model, cfg.eval)
    print(f"pipeline: evaluated {label} on {result['n']} held-out problems in {time.perf_counter() - t:.0f}s", flush=True)
    write_json({"model": _rel(model, cfg.dir), "result": result}, out)
    return json.loads(out.read_text())["result"]


def _fmt(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_summary(summary: dict[str, Any]) -> str:
    """The stage table as Markdown (what summary.md holds and the runner prints)."""
    lines = [f"## Pipeline {summary['recipe']}: held-out evaluation ({summary['eval']['n']} problems, "
             f"{summary['eval']['how']}, same rows for every model)", "",
             "| model | stage | held-out acc [95% CI] | mean length | format rate | truncation rate |",
             "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lo, hi = r["ci"]
        lines.append(f"| {r['model']} | {r['stage']} | {r['acc']:.3f} [{lo:.3f}, {hi:.3f}] | {_fmt(r['length'], 1)} | "
                     f"{_fmt(r['format_rate'])} | {_fmt(r['truncation_rate'])} |")
    lines += ["", "| # | stage | kind | reads | status | seconds |", "|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['index'] + 1} | {s['name']} | {s['kind']} | {s['model_in'] or '-'} | {s['status']} | "
                     f"{_fmt(s.get('seconds'), 0)} |")
    if summary.get("evals"):
        lines += ["", "| eval stage | model | k | avg@k [95% CI] | pass@k | cons@k | mean length |", "|---|---|---|---|---|---|---|"]
        for e in summary["evals"]:
            lo, hi = e["ci"]
            lines.append(f"| {e['stage']} | {e['model']} | {e['k']} | {e['acc']:.3f} [{lo:.3f}, {hi:.3f}] | "
                         f"{_fmt(e['pass@k'])} | {_fmt(e['cons@k'])} | {_fmt(e['length'], 1)} |")
    return "\n".join(lines) + "\n"


def _write_summary(cfg: PipelineConfig, rows: list[dict[str, Any]], stages: list[dict[str, Any]],
                   evals: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    e = cfg.eval
    how = "greedy" if e.temperature == 0 and e.k == 1 else f"k={e.k}, temperature {e.temperature}"
    summary = {
        "kind": "pipeline", "recipe": cfg.recipe, "dir": str(cfg.dir), "base": cfg.base,
        "eval": {"task": e.data.task, "n": e.data.heldout_size, "how": how, "max_new_tokens": e.rollout.max_new_tokens,
                 "format": e.format},
        "rows": rows, "stages": stages, "evals": evals, "seconds": time.perf_counter() - t0,
    }
    _atomic_json(summary, cfg.dir / SUMMARY_FILE)
    text = format_summary(summary)
    _atomic_text(text, cfg.dir / SUMMARY_MD)
    print(text, flush=True)
    return summary


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run (or continue) every stage; returns the pipeline directory (summary.json, summary.md, report.html)."""
    import torch

    t0 = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    root = cfg.dir
    root.mkdir(parents=True, exist_ok=True)
    _atomic_json(cfg.raw, root / PIPELINE_FILE)
    print(f"grpokit pipeline {cfg.recipe}: {len(cfg.stages)} stages in {root}", flush=True)
    status = [{"index": s.index, "name": s.name, "kind": s.kind, "dir": _dirname(s), "model_in": None,
               "status": "pending", "seconds": None} for s in cfg.stages]
    rows = [{"stage": "-", **eval_row("base", _evaluate(cfg, "base", Path(cfg.base)))}]
    evals: list[dict[str, Any]] = []
    _write_summary(cfg, rows, status, evals, t0)
    models: dict[str, Path] = {"base": Path(cfg.base)}
    datasets: dict[str, Path] = {}
    current = Path(cfg.base)
    for spec, st in zip(cfg.stages, status):
        stage = STAGES.get(spec.kind)()
        run_dir = root / _dirname(spec)
        model_in = current if spec.model == "previous" else models.get(spec.model, Path(spec.model))
        if spec.kind == "sft" and spec.data:
            if spec.data == "previous":
                spec.data_path = str(list(datasets.values())[-1])
            else:
                spec.data_path = str(datasets.get(spec.data, Path(spec.data)))
        st["model_in"] = "base" if model_in == Path(cfg.base) else _rel(model_in, root)
        marker = run_dir / DONE_MARKER
        if marker.exists():
            info = json.loads(marker.read_text())
            model_out = _abs(info["model_out"], root)
            st.update(status="done (skipped on resume)", seconds=info.get("seconds"))
            print(f"pipeline: stage {spec.index + 1} {spec.name} ({spec.kind}) already finished; skipped", flush=True)
        else:
            resumed = run_dir.exists()
            print(f"pipeline: stage {spec.index + 1}/{len(cfg.stages)} {spec.name} ({spec.kind}) reads {st['model_in']}"
                  f"{', resuming' if resumed else ''} -> {run_dir}", flush=True)
            t = time.perf_counter()
            model_out = Path(stage.run(spec, model_in, run_dir))
            seconds = time.perf_counter() - t
            write_marker(run_dir, {"kind": spec.kind, "name": spec.name, "model_in": st["model_in"],
                                   "model_out": _rel(model_out, root), "seconds": seconds})
            st.update(status="done", seconds=seconds)
            if not cfg.keep_checkpoints and (run_dir / "checkpoints").is_dir():
                # a finished stage is skipped on resume and later stages read its final/: its optimizer-state
                # checkpoints (1.6 GB each for a 135M model) serve nothing once the marker is written
                shutil.rmtree(run_dir / "checkpoints")
        models[spec.name] = current = model_out
        if stage.dataset:
            datasets[spec.name] = run_dir / stage.dataset
        if stage.produces_model:
            rows.append({"stage": spec.kind, **eval_row(spec.name, _evaluate(cfg, spec.name, model_out))})
        if spec.kind == "eval" and (run_dir / "eval.json").exists():
            res = json.loads((run_dir / "eval.json").read_text())
            row = eval_row(st["model_in"], res)
            evals.append({"stage": spec.name, **row, "pass@k": res["pass@k"].get(str(res["k"])), "cons@k": res.get("cons@k")})
        _write_summary(cfg, rows, status, evals, t0)
    try:
        from grpokit.report.html import write_report

        print(f"report: {write_report(root)}")
    except Exception as e:  # the report is a convenience; the table is already saved
        print(f"pipeline: report not written ({type(e).__name__}: {e})", file=sys.stderr)
    return root
