"""Pure math of GRPO-family post-training: tensors and keyword hyperparameters in, tensors out.

Imports only torch and the standard library; no config objects, no logging, no torch.distributed.
Every formula is in SPEC.md; the contracts are in docs/interfaces.md. The registries below are the
extension points; `grpokit list` prints REGISTRIES with each entry's first docstring line.
"""
from grpokit.algo.advantages import ADVANTAGES
from grpokit.algo.aggregate import AGGREGATIONS
from grpokit.algo.credit import CREDIT, SEQ_WEIGHTS
from grpokit.algo.kl import KL
from grpokit.algo.losses import LOSSES
from grpokit.algo.masks import TOKEN_MASKS
from grpokit.algo import process as _process  # noqa: F401  (registers credit 'process', SPEC 13)
from grpokit.algo.registry import Registry

REGISTRIES: dict[str, Registry] = {
    "advantage": ADVANTAGES,
    "credit": CREDIT,
    "loss": LOSSES,
    "aggregation": AGGREGATIONS,
    "kl": KL,
    "seq_weight": SEQ_WEIGHTS,
    "token_mask": TOKEN_MASKS,
}

__all__ = ["ADVANTAGES", "CREDIT", "LOSSES", "AGGREGATIONS", "KL", "SEQ_WEIGHTS", "TOKEN_MASKS", "REGISTRIES", "Registry"]
