"""Pipeline stages run one after another (SPEC 10, the DeepSeek-R1 recipe: SFT -> RL -> rejection sampling
-> SFT). Importing this package loads nothing heavy; each stage lives in its own module:

    from grpokit.pipeline.sample import load_sample_config, run_sample   # `grpokit sample RECIPE`
    jsonl = run_sample(load_sample_config("recipes/sample/r1_traces.toml", ["sample.n=8"]))

    from grpokit.pipeline.runner import load_pipeline, run_pipeline      # `grpokit pipeline RECIPE`
    pipe_dir = run_pipeline(load_pipeline("recipes/pipeline/r1.toml", ["stages.1.train.steps=4"]))

The stage kinds (sft, rl, sample, eval) and the `Stage` protocol are in grpokit.pipeline.stages.
"""

__all__ = ["load_pipeline", "run_pipeline", "STAGES", "Stage", "StageSpec"]

_EXPORTS = {"load_pipeline": "runner", "run_pipeline": "runner", "STAGES": "stages", "Stage": "stages", "StageSpec": "stages"}


def __getattr__(name: str):  # lazy: `import grpokit.pipeline` stays light
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"grpokit.pipeline.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'grpokit.pipeline' has no attribute {name!r}")
