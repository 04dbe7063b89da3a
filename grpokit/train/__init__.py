"""Training: the RL loop (`loop`), its steps (`collect`, `update`, `step`), checkpoints, metrics, SFT.

The package is also callable: `grpokit.train(config, model=..., reward_funcs=[...], dataset=...)` is
`grpokit.api.train` (the TRL-style Python API), while `grpokit.train.loop` etc. stay importable modules.
"""
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        from grpokit.api import train

        return train(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
