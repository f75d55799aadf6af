"""``solve(problem, keep, backend, **options)``: run a backend and re-fit its answer exactly."""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Sequence
from typing import Any

from osscar_opt import backends
from osscar_opt.backends.base import SearchResult
from osscar_opt.problem import LayerProblem
from osscar_opt.solution import Solution


def check_keep(problem: LayerProblem, keep) -> int:
    """Validate the budget: an integer in ``[0, problem.num_groups]`` (an int, a numpy integer or an
    integer 0-d tensor; floats and float tensors, even 2.0, are refused, never truncated)."""
    if isinstance(keep, bool):
        raise ValueError(f"keep: expected an integer number of groups, got {keep!r}")
    try:
        keep = operator.index(keep)
    except TypeError:
        raise ValueError(f"keep: expected an integer number of groups, got {keep!r}") from None
    if keep < 0 or keep > problem.num_groups:
        raise ValueError(f"keep: must be in [0, {problem.num_groups}] (the number of groups), got {keep}")
    return keep


def relative_gap(loss: float, lower_bound: float | None) -> float | None:
    """``(loss - lower_bound) / loss``, clipped at 0 for round-off; 0 when loss is 0 and the bound
    is 0 too (a loss cannot be negative: problems with an inconsistent ``c0`` are refused)."""
    if lower_bound is None:
        return None
    if loss <= 0:
        return 0.0 if lower_bound >= loss else float("inf")
    return max(0.0, (loss - lower_bound) / loss)


BOUND_TOLERANCE = 1e-6
"""A backend's lower bound may exceed its loss by this much (relative) for round-off; more is an error."""


def _checked_bound(lower_bound, loss: float, c0: float, backend_name: str) -> float | None:
    """A backend's lower bound as a float: finite and at most the loss (up to round-off, then clipped)."""
    if lower_bound is None:
        return None
    try:
        bound = float(lower_bound)
    except (TypeError, ValueError):
        raise ValueError(f"backend {backend_name!r} returned a lower bound that is not a number: {lower_bound!r}") \
            from None
    if not math.isfinite(bound):
        raise ValueError(f"backend {backend_name!r} returned a non-finite lower bound ({bound})")
    if bound > loss + BOUND_TOLERANCE * max(loss, c0 * 1e-9, 1e-300):
        raise ValueError(
            f"backend {backend_name!r} returned a lower bound {bound:.9g} above the loss {loss:.9g} of its own "
            "solution: the bound is invalid"
        )
    return min(bound, loss)


def finish(
    problem: LayerProblem,
    keep: int,
    result: SearchResult | Sequence[int],
    backend_name: str,
    seconds: float,
) -> Solution:
    """Turn a backend's answer into a :class:`Solution`, re-computing loss and weights exactly."""
    if not isinstance(result, SearchResult):
        result = SearchResult(support=result)
    support = problem.check_support(result.support, name=f"support returned by backend {backend_name!r}")
    if len(support) != keep:
        raise ValueError(
            f"backend {backend_name!r} returned {len(support)} groups for keep={keep} (expected exactly {keep})"
        )
    loss, weights, bias = problem.evaluate(support)
    lower_bound = _checked_bound(result.lower_bound, loss, problem.c0, backend_name)
    return Solution(
        support=support,
        loss=loss,
        weights=weights,
        bias=bias,
        lower_bound=lower_bound,
        gap=relative_gap(loss, lower_bound),
        status=result.status,
        backend=backend_name,
        seconds=seconds,
        keep=keep,
        path=list(result.path),
        info=dict(result.info),
    )


def solve(problem: LayerProblem, keep: int, backend: str = "local-search", **options: Any) -> Solution:
    """Choose ``keep`` groups of ``problem`` with ``backend`` and re-fit the kept weights.

    ``keep == problem.num_groups`` returns every group and ``keep == 0`` the empty support (loss
    ``c0``), both as proven optimal without calling the backend.
    """
    if not isinstance(problem, LayerProblem):
        raise ValueError(f"problem: expected a LayerProblem, got {type(problem).__name__}")
    keep = check_keep(problem, keep)
    backend_cls = backends.get(backend)
    if keep in (0, problem.num_groups):
        start = time.perf_counter()
        support = tuple(range(keep))
        loss = problem.loss(support)
        return finish(
            problem, keep, SearchResult(support, status="optimal", lower_bound=loss), backend,
            time.perf_counter() - start,
        )
    if not backend_cls.is_installed():
        raise ValueError(f"backend: {backend_cls.missing_message()}")
    start = time.perf_counter()
    result = backend_cls().solve(problem, keep, **options)
    seconds = time.perf_counter() - start
    return finish(problem, keep, result, backend, seconds)
