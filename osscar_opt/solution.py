"""The result of solving a layer problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class PathPoint:
    """A support visited at an intermediate budget (e.g. after each removal stage)."""

    keep: int
    support: tuple[int, ...]
    loss: float


@dataclass
class Solution:
    """A support for one layer problem with its exactly re-fit weights.

    Attributes:
        support: sorted tuple of kept group ids.
        loss: objective value of ``support``, recomputed from scratch in float64.
        weights: optimal ``(m, p_in)`` weight for ``support`` (zeros in pruned columns), float64.
        bias: re-fit bias ``(m,)`` when the problem re-fits the bias, else None.
        lower_bound: a proven lower bound on the optimal loss (None for heuristics).
        gap: ``(loss - lower_bound) / loss`` when a bound is known, else None.
        status: "heuristic", "optimal", "time_limit", ...
        backend: registry name of the backend that produced it.
        seconds: wall-clock seconds of the backend call.
        keep: the budget that was asked for.
        path: supports visited at intermediate budgets with their losses (may be empty). Path
            losses are the backend's running values, not re-computed from scratch.
        info: backend-specific counters (iterations, swaps, ...).
    """

    support: tuple[int, ...]
    loss: float
    weights: torch.Tensor
    bias: torch.Tensor | None
    lower_bound: float | None
    gap: float | None
    status: str
    backend: str
    seconds: float
    keep: int
    path: list[PathPoint] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary without the weights."""
        return {
            "backend": self.backend,
            "keep": self.keep,
            "support": list(self.support),
            "loss": self.loss,
            "lower_bound": self.lower_bound,
            "gap": self.gap,
            "status": self.status,
            "seconds": self.seconds,
            "info": {k: v for k, v in self.info.items() if isinstance(v, int | float | str | bool)},
        }
