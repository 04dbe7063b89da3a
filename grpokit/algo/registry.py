"""Named extension points: one registry per kind, one signature per registry, one call site.

The caller never branches on a registered name. `Registry.call` passes each function only the keyword
hyperparameters its signature declares, so a trainer can hand every registered function the same
keyword set (the typed config validates the names; this only routes them). `Registry.call_strict`
refuses a keyword the function does not take instead of dropping it, and `Registry.accepts` says which
keywords a function takes (what the config checks user-set fields against). An unknown name fails
with the list of valid names.
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
        self._ignores: dict[str, frozenset[str]] = {}

    def register(self, name: str, *, ignores: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator. `ignores`: keywords the function declares only for the uniform signature and has
        no effect on (e.g. CISPO's `dual_clip_c`); `accepts` leaves them out, so a user who sets one
        is told it does nothing."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._fns:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._fns[name] = fn
            self._ignores[name] = frozenset(ignores)
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

    def accepts(self, name: str) -> frozenset[str] | None:
        """The keyword hyperparameters `name` takes and acts on; None when it takes any (**kwargs)."""
        params = inspect.signature(self.get(name)).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return None
        keywords = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        return frozenset(keywords - self._ignores[name])

    def defaults(self, name: str) -> dict[str, Any]:
        """The default value of every keyword hyperparameter `name` declares (those without one left out)."""
        params = inspect.signature(self.get(name)).parameters
        return {k: p.default for k, p in params.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}

    def call_strict(self, name: str, *args: Any, **hparams: Any) -> Any:
        """Call `name` with `args` and every keyword of `hparams`; one it does not take (see `accepts`)
        is a ValueError naming the keyword and the function, instead of being dropped silently."""
        fn = self.get(name)
        taken = self.accepts(name)
        extra = sorted(set(hparams) - taken) if taken is not None else []
        if extra:
            raise ValueError(
                f"{self.kind} '{name}' does not take {', '.join(extra)} (it takes: {', '.join(sorted(taken)) or 'none'}); "
                f"leave {'them' if len(extra) > 1 else 'it'} unset or choose a {self.kind} that uses {'them' if len(extra) > 1 else 'it'}"
            )
        return fn(*args, **hparams)

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
