"""grpokit: RL post-training of language models with verifiable rewards (GRPO, DAPO, Dr. GRPO, GSPO, FIPO, FRPO)."""
__version__ = "0.1.0"
