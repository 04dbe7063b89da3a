"""Pure math of GRPO-family post-training: tensors and keyword hyperparameters in, tensors out.

Imports only torch and the standard library; no config objects, no logging, no torch.distributed.
Every formula is in SPEC.md; the contracts are in docs/interfaces.md. The registries below are the
extension points; `grpokit list` prints REGISTRIES with each entry's first docstring line.
"""
from grpokit.algo.advantages import ADVANTAGES
from grpokit.algo.aggregate import AGGREGATIONS
from grpokit.algo.catalogue import ADV_TRANSFORMS, KL_WEIGHTS
from grpokit.algo.correction import CORRECTIONS
from grpokit.algo.credit import CREDIT, SEQ_WEIGHTS
from grpokit.algo.distill import DISTILL
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
    "distill": DISTILL,
    "adv_transform": ADV_TRANSFORMS,
    "kl_weight": KL_WEIGHTS,
    "correction": CORRECTIONS,
    "token_mask": TOKEN_MASKS,
}

__all__ = ["ADVANTAGES", "CREDIT", "LOSSES", "AGGREGATIONS", "KL", "SEQ_WEIGHTS", "DISTILL", "ADV_TRANSFORMS", "KL_WEIGHTS",
           "CORRECTIONS", "TOKEN_MASKS", "REGISTRIES", "Registry"]
