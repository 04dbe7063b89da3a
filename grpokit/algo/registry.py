"""Named extension points: one registry per kind, one signature per registry, one call site.

The caller never branches on a registered name. `Registry.call` passes each function only the keyword
hyperparameters its signature declares, so a trainer can hand every registered function the same
keyword set (the typed config validates the names; this only routes them). An unknown name fails with
the list of valid names.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Iterator


class Registry:
    """A mapping from name to function for one extension point (advantages, losses, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._fns:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._fns[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._fns[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._fns, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(
                f"unknown {self.kind} '{name}'{hint}; valid names: {', '.join(sorted(self._fns))}"
            ) from None

    def call(self, name: str, *args: Any, **hparams: Any) -> Any:
        """Call `name` with `args` and those of `hparams` that its signature accepts."""
        fn = self.get(name)
        params = inspect.signature(fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return fn(*args, **hparams)
        return fn(*args, **{k: v for k, v in hparams.items() if k in params})

    def names(self) -> list[str]:
        return sorted(self._fns)

    def summary(self) -> list[tuple[str, str]]:
        """(name, first line of the docstring) for every entry, sorted by name."""
        out = []
        for name in self.names():
            doc = inspect.getdoc(self._fns[name]) or ""
            out.append((name, doc.splitlines()[0] if doc else ""))
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
