"""The small interface every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from osscar_opt.problem import LayerProblem
from osscar_opt.solution import PathPoint


@dataclass
class SearchResult:
    """What a backend returns: a support and what it knows about it.

    ``osscar_opt.solve`` re-computes the loss and the weights of ``support`` from scratch, so a
    backend never has to. ``lower_bound`` must be a *proven* bound on the optimal loss, or None.
    """

    support: Sequence[int]
    status: str = "heuristic"
    lower_bound: float | None = None
    path: list[PathPoint] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Backend:
    """Base class of a solver backend.

    Subclasses set ``name`` and implement :meth:`solve`, which may return a :class:`SearchResult`
    or just the kept group ids. ``exact`` backends return proven lower bounds.
    ``requires`` names Python modules the backend needs; :meth:`is_installed` checks them
    without importing them, and ``extra`` names the pip extra of osscar-opt that installs them.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def is_installed(cls) -> bool:
        import importlib.util

        return all(importlib.util.find_spec(module) is not None for module in cls.requires)

    @classmethod
    def missing_message(cls) -> str | None:
        """None when :meth:`is_installed`; else which required modules are missing and the pip command."""
        import importlib.util

        missing = [module for module in cls.requires if importlib.util.find_spec(module) is None]
        if not missing:
            return None
        from osscar_opt._extras import install_hint

        hint = install_hint(missing[0], cls.extra) if cls.extra else f"pip install {missing[0]}"
        return f"{cls.name or cls.__name__!r} needs {missing}, which are not installed: {hint}"

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult | Sequence[int]:
        raise NotImplementedError


def check_options(backend: str, given: dict[str, Any], allowed: Sequence[str]) -> None:
    """Reject unknown option names with a message that lists the accepted ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(
            f"options: backend {backend!r} does not accept {unknown}; accepted: {sorted(allowed)}"
        )


def declared_options(cls: type) -> tuple[str, ...] | None:
    """The option names backend ``cls`` declares, or None when it does not say (its solve checks them)."""
    if any("options" in vars(klass) for klass in cls.__mro__ if klass not in (Backend, object)):
        return tuple(cls.options)
    return None
