"""The command line: `grpokit train | sft | sample | pipeline | eval | report | list`."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe(spec: str) -> Path:
    """A recipe path, or the name of a bundled recipe (`fipo` -> recipes/fipo.toml)."""
    p = Path(spec)
    if p.exists():
        return p
    bundled = RECIPES / f"{spec}.toml"
    if bundled.exists():
        return bundled
    from grpokit.preflight import UserError

    names = sorted(q.stem for q in RECIPES.glob("*.toml"))
    raise UserError(f"recipe '{spec}' not found; give a TOML path or one of: {', '.join(names)}")


def cmd_train(args: argparse.Namespace) -> int:
    from grpokit.config import load_config
    from grpokit.preflight import UserError, check_inputs
    from grpokit.train.loop import TrainingStopped, train

    path = resolve_recipe(args.recipe) if args.recipe else None
    if args.resume and not Path(args.resume).exists():
        raise UserError(f"--resume {args.resume}: no such run directory")
    if args.resume and path is None and (Path(args.resume) / "config.toml").exists():
        path = Path(args.resume) / "config.toml"
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        cfg = load_config(path, args.set)
    check_inputs(cfg)
    try:
        train(cfg, resume=args.resume)
    except TrainingStopped as e:
        print(f"grpokit: {e}", file=sys.stderr)
        return 3
    return 0


def resolve_sft_recipe(spec: str) -> Path:
    """An SFT recipe path, or the name of a bundled one (`demo` -> recipes/sft/demo.toml)."""
    p = Path(spec)
    if p.exists():
        return p
    for bundled in (RECIPES / "sft" / f"{spec}.toml", RECIPES / "sft" / f"{spec.removeprefix('sft/')}.toml"):
        if bundled.exists():
            return bundled
    from grpokit.config import ConfigError

    names = sorted(q.stem for q in (RECIPES / "sft").glob("*.toml"))
    raise ConfigError(f"SFT recipe '{spec}' not found; give a TOML path or one of: {', '.join(names)}")


def cmd_sft(args: argparse.Namespace) -> int:
    from grpokit.config import ConfigError
    from grpokit.train.sft_config import load_sft_config
    from grpokit.train.sft_data import SFTDataError
    from grpokit.train.sft_stage import run_sft

    try:
        path = resolve_sft_recipe(args.recipe) if args.recipe else None
        if args.resume and not Path(args.resume).exists():
            raise ConfigError(f"--resume {args.resume}: no such run directory")
        if args.resume and path is None and (Path(args.resume) / "config.toml").exists():
            path = Path(args.resume) / "config.toml"
        with warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)
            cfg = load_sft_config(path, args.set)
        run_sft(cfg, resume=args.resume)
    except (ConfigError, SFTDataError) as e:  # user errors: one line, status 2, no traceback
        print(f"grpokit: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from grpokit.algo import REGISTRIES

    regs = dict(REGISTRIES)
    try:
        from grpokit.rewards import REWARDS

        regs["reward"] = REWARDS
    except ImportError:
        pass
    try:
        from grpokit.data import TASKS

        regs["task"] = TASKS
    except ImportError:
        pass
    from grpokit.transforms import TRANSFORMS

    regs["transform"] = TRANSFORMS
    from grpokit.rollout.engine import ENGINES

    regs["engine"] = ENGINES
    kinds = [args.kind] if args.kind else list(regs) + ["recipe"]
    for kind in kinds:
        if kind == "recipe":
            print("recipe")
            for p in sorted(RECIPES.glob("*.toml")) + sorted(RECIPES.glob("sft/*.toml")) + sorted(RECIPES.glob("sample/*.toml")) + sorted(RECIPES.glob("pipeline/*.toml")):
                first = next((ln.lstrip("# ").strip() for ln in p.read_text().splitlines() if ln.startswith("#")), "")
                name = p.stem if p.parent == RECIPES else f"{p.parent.name}/{p.stem}"
                print(f"  {name:<26} {first}")
            continue
        if kind not in regs:
            print(f"grpokit: unknown kind '{kind}'; choose from {', '.join(list(regs) + ['recipe'])}", file=sys.stderr)
            return 2
        print(kind)
        for name, line in regs[kind].summary():
            print(f"  {name:<26} {line}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from grpokit.report.cli import eval_command

    return eval_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    from grpokit.report.html import write_report

    print(write_report(Path(args.run_dir)))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """`grpokit sample RECIPE`: rejection sampling (grpokit.pipeline.sample); recipes in recipes/sample/."""
    from grpokit.pipeline.sample import load_sample_config, run_sample
    from grpokit.preflight import UserError, check_dataset, check_model, check_rewards

    path = None
    if args.recipe:
        path = Path(args.recipe)
        if not path.exists():
            path = RECIPES / "sample" / f"{args.recipe.removeprefix('sample/')}.toml"
        if not path.exists():
            names = sorted(q.stem for q in (RECIPES / "sample").glob("*.toml"))
            raise UserError(f"sample recipe '{args.recipe}' not found; give a TOML path or one of: {', '.join(names)}")
    cfg = load_sample_config(path, args.set)
    check_model(cfg.model.name)  # a run directory passes too: its final/ model is loaded
    check_dataset(cfg.data.task)
    check_rewards(cfg.rewards.functions)
    run_sample(cfg)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """`grpokit pipeline RECIPE [--set stages.N.field=...] [--resume DIR]` (grpokit.pipeline.runner)."""
    import json

    from grpokit.pipeline.runner import PIPELINE_FILE, load_pipeline, run_pipeline
    from grpokit.preflight import UserError

    path, data = None, None
    if args.recipe:
        path = Path(args.recipe)
        if not path.exists():
            path = RECIPES / "pipeline" / f"{args.recipe.removeprefix('pipeline/')}.toml"
        if not path.exists():
            names = sorted(q.stem for q in (RECIPES / "pipeline").glob("*.toml"))
            raise UserError(f"pipeline recipe '{args.recipe}' not found; give a TOML path or one of: {', '.join(names)}")
    if args.resume:
        saved = Path(args.resume) / PIPELINE_FILE
        if not saved.exists():
            raise UserError(f"--resume {args.resume}: no {PIPELINE_FILE} there; give the directory a pipeline run wrote")
        if path is None:
            data = json.loads(saved.read_text())
    elif path is None:
        raise UserError("give a pipeline recipe (e.g. `grpokit pipeline r1`) or --resume DIR")
    cfg = load_pipeline(path, args.set, data=data, dir=args.resume)
    from grpokit.train.sft_data import SFTDataError

    try:
        run_pipeline(cfg)
    except SFTDataError as e:  # bad SFT data in a stage: one line, like `grpokit sft`
        raise UserError(str(e)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    from grpokit.config import help_text

    p = argparse.ArgumentParser(prog="grpokit", description="RL post-training of language models with verifiable rewards.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a policy from a TOML recipe", epilog=help_text(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("recipe", nargs="?", help="recipe TOML path or bundled name (grpo, dapo, fipo, frpo, ...)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set algo.beta=0.01 (repeatable)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint (or a checkpoint directory)")
    t.set_defaults(fn=cmd_train)
    from grpokit.train.sft_config import sft_help_text

    s = sub.add_parser("sft", help="supervised fine-tuning on (prompt, completion) rows from a TOML recipe",
                       epilog=sft_help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("recipe", nargs="?", help="SFT recipe TOML path or bundled name (recipes/sft/: demo)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint (or a checkpoint directory)")
    s.set_defaults(fn=cmd_sft)

    from grpokit.pipeline.sample import sample_help_text

    sm = sub.add_parser("sample", help="rejection sampling: N completions per prompt, keep the correct and clean ones as an SFT JSONL",
                        epilog=sample_help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sm.add_argument("recipe", nargs="?", help="sample recipe TOML path or bundled name (recipes/sample/: r1_traces)")
    sm.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a config field, e.g. --set sample.n=16 (repeatable)")
    sm.set_defaults(fn=cmd_sample)
    pl = sub.add_parser("pipeline", help="run a multi-stage recipe (sft, rl, sample, eval stages; DeepSeek-R1) with a stage table",
                        description="Run the [[stages]] of a pipeline recipe (recipes/pipeline/: r1); each stage takes the tables of "
                                    "its command's config (grpokit sft/train/sample --help). Finished stages are skipped on --resume.")
    pl.add_argument("recipe", nargs="?", help="pipeline recipe TOML path or bundled name (recipes/pipeline/: r1)")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field, e.g. --set stages.1.train.steps=5 (stage by 0-based index or name) or --set eval.data.heldout_size=50")
    pl.add_argument("--resume", metavar="DIR", help="continue the pipeline directory DIR (its recipe is read from DIR when none is given)")
    pl.set_defaults(fn=cmd_pipeline)
    ls = sub.add_parser("list", help="list registered advantages, credits, losses, aggregations, KLs, rewards, tasks, recipes")
    ls.add_argument("kind", nargs="?")
    ls.set_defaults(fn=cmd_list)
    e = sub.add_parser("eval", help="evaluate a model or run directory on a task: avg@k, cons@k, pass@k")
    e.add_argument("model", help="model name, HF directory, or a run directory (uses RUN/final)")
    e.add_argument("--task", default="arith")
    e.add_argument("--n", type=int, default=100, help="held-out problems")
    e.add_argument("--k", type=int, default=1, help="samples per problem")
    e.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for k=1, else 1.0")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--reward", action="append", default=None, help="reward function(s) deciding correctness")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    e.set_defaults(fn=cmd_eval)
    r = sub.add_parser("report", help="write the self-contained HTML report of a run directory")
    r.add_argument("run_dir")
    r.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Known user errors (config, paths, imports) print one line, `grpokit: error: ...`, and return 2."""
    from grpokit.config import ConfigError
    from grpokit.preflight import UserError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, UserError) as e:
        print(f"grpokit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
