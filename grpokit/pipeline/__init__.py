"""Pipeline stages run one after another (SPEC 10, the DeepSeek-R1 recipe: SFT -> RL -> rejection sampling
-> SFT). Importing this package loads nothing heavy; each stage lives in its own module:

    from grpokit.pipeline.sample import load_sample_config, run_sample   # `grpokit sample RECIPE`
    jsonl = run_sample(load_sample_config("recipes/sample/r1_traces.toml", ["sample.n=8"]))
"""
