"""A tiny name -> function registry, one per method kind (scoring, grouping, scaling).

Each entry also records which calibration statistics the method needs (docs/stats.md "needs"
column), so the CLI can refuse a plan that needs expert-output statistics before any expensive
work, and calibration can skip collecting them when no chosen method needs them.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from ...core.errors import UserError

NEEDS = ("none", "router", "full")
"""Statistics a method requires: nothing, the router-only sums, or the expert-output sums too."""

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Maps method names to functions; `kind` ("scoring", ...) only shapes error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}
        self._needs: dict[str, str] = {}
        self._options: dict[str, dict[str, str]] = {}

    def register(self, name: str, *, needs: str = "none", options: dict[str, str] | None = None) -> Callable[[F], F]:
        """Decorator: `@REG.register("cp", needs="router")`. Registering a name twice is a bug.

        `options` maps the plan's method settings (`plan.MethodOptions` fields) that this method
        reads to the keyword argument that receives each.
        """
        if needs not in NEEDS:
            raise ValueError(f"needs must be one of {NEEDS}, got {needs!r}")

        def deco(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._fns[name] = fn
            self._needs[name] = needs
            self._options[name] = dict(options or {})
            return fn

        return deco

    def _check(self, name: str) -> None:
        if name not in self._fns:
            raise UserError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}")

    def get(self, name: str) -> F:
        """The function registered as `name`; an unknown name is a UserError listing valid ones."""
        self._check(name)
        return self._fns[name]

    def needs(self, name: str) -> str:
        """"none" | "router" | "full" for `name` (unknown names are a UserError)."""
        self._check(name)
        return self._needs[name]

    def options(self, name: str, settings: Any) -> dict[str, Any]:
        """The keyword arguments `name` takes from `settings` (an object with the option fields)."""
        self._check(name)
        return {kw: getattr(settings, field) for field, kw in self._options[name].items()}

    def names(self) -> list[str]:
        """Registered names, in registration order (the order the CLI lists them)."""
        return list(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self._fns)

    def __len__(self) -> int:
        return len(self._fns)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
