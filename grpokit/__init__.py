"""grpokit: RL post-training of language models with verifiable rewards (GRPO, DAPO, Dr. GRPO, GSPO, FIPO, FRPO).

`grpokit.train(config, model=..., reward_funcs=[...], dataset=...)` trains from Python objects (see
`grpokit.api`); `grpokit train RECIPE` does the same from the command line.
"""
__version__ = "0.1.0"

from grpokit import train  # noqa: E402  (the callable package: grpokit.train(...) runs grpokit.api.train)

__all__ = ["train", "__version__"]
