"""Pieces shared by the exact backends (``scip``, ``gurobi``, ``cvxpy``): options, warm start, incumbents.

They solve one of two formulations of the same problem (docs/architecture.md,
"Exact formulations"; the math is in :mod:`osscar_opt.relaxation`):

- ``"outer-approximation"``: binaries ``z`` and one epigraph variable ``eta`` with cuts
  ``eta >= f(z_t) + grad f(z_t) . (z - z_t)`` of the convex perspective function ``f``;
- ``"miqp"``: the perspective mixed-integer program in whitened thin-factor variables.

Objective values inside the solvers are in units of ``c0`` (the loss of the empty support), so
that solver tolerances are relative; bounds handed back are in loss units with a safety margin.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from osscar_opt.backends import _search
from osscar_opt.backends.base import SearchResult
from osscar_opt.problem import LayerProblem
from osscar_opt.relaxation import Cut, PerspectiveFunction, block_shift, make_shift, relax, safe_bound

FORMULATIONS = ("outer-approximation", "miqp")
FORMULATION_ALIASES = {"oa": "outer-approximation", "outer-approximation": "outer-approximation",
                       "miqp": "miqp", "perspective": "miqp", "misocp": "miqp"}


def check_formulation(value: Any) -> str:
    """Normalize the ``formulation`` option."""
    if value not in FORMULATION_ALIASES:
        raise ValueError(f"formulation: expected one of {FORMULATIONS}, got {value!r}")
    return FORMULATION_ALIASES[value]


def check_positive(name: str, value: Any, allow_none: bool = True) -> float | None:
    """A positive number (or None when allowed), else ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def check_gap(options: dict[str, Any], default: float = 1e-6) -> float:
    """``rel_gap`` (alias ``mip_gap``): relative optimality tolerance in ``[0, 1)``."""
    if "rel_gap" in options and "mip_gap" in options:
        raise ValueError("rel_gap: give rel_gap or its alias mip_gap, not both")
    value = options.get("rel_gap", options.get("mip_gap", default))
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"rel_gap: expected a number in [0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CommonOptions:
    """The options every exact backend takes, checked."""

    formulation: str
    time_limit: float | None
    rel_gap: float
    shift: str
    relaxation_iterations: int
    warm_start: Any


def common_options(options: dict[str, Any]) -> CommonOptions:
    """Check and default ``formulation``, ``time_limit``, ``rel_gap``, ``shift``, ``relaxation_iterations``."""
    return CommonOptions(
        formulation=check_formulation(options.get("formulation", "outer-approximation")),
        time_limit=check_positive("time_limit", options.get("time_limit")),
        rel_gap=check_gap(options),
        shift=options.get("shift", "scalar"),
        relaxation_iterations=check_count("relaxation_iterations", options.get("relaxation_iterations", 30)),
        warm_start=options.get("warm_start", True),
    )


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """An integer count of at least ``minimum`` (iterations, masters), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"{name}: expected a {kind} integer, got {value!r}")
    return value


# Named warm starts: the shared search algorithm each runs, with its default options.
WARM_STARTS = {"local-search": _search.local_search, "greedy": _search.greedy}


def warm_start(problem: LayerProblem, keep: int, value: Any,
               time_limit: float | None = None) -> tuple[int, ...] | None:
    """The warm-start support.

    True or "local-search" (the default): the support the ``local-search`` backend finds with its
    default options (within ``time_limit`` seconds when given); "greedy": the ``greedy`` backend's;
    False/None: none; or group ids, or an object with a ``support`` (such as a
    :class:`~osscar_opt.solution.Solution`).
    """
    if value is False or value is None:
        return None
    if value is True:
        value = "local-search"
    if isinstance(value, str):
        if value not in WARM_STARTS:
            raise ValueError(
                f"warm_start: unknown warm start {value!r}; expected True (the local-search solution), False or "
                f"None (no warm start), one of {sorted(WARM_STARTS)}, group ids, or a Solution"
            )
        options = {"time_limit": max(time_limit, 1e-3)} if value == "local-search" and time_limit is not None else {}
        return problem.check_support(WARM_STARTS[value](problem, keep, **options).support, "warm_start")
    support = problem.check_support(getattr(value, "support", value), "warm_start")
    if len(support) > keep:
        raise ValueError(f"warm_start: keeps {len(support)} groups, more than keep={keep}")
    return support


@dataclass
class Incumbent:
    """Best support seen (every visited binary point is feasible; its ``f`` is its loss)."""

    support: tuple[int, ...] = ()
    loss: float = math.inf
    visited: int = 0

    def offer(self, support: Sequence[int], loss: float) -> None:
        self.visited += 1
        if loss < self.loss:
            self.support, self.loss = tuple(sorted(int(g) for g in support)), float(loss)


def support_of(values: Sequence[float] | torch.Tensor, keep: int) -> tuple[int, ...]:
    """The ``keep`` largest entries of a binary or fractional vector (a solver's point, a relaxation
    iterate), as sorted group ids: always a feasible support of size ``keep``."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    return tuple(sorted(int(g) for g in torch.topk(values, keep).indices)) if keep else ()


def binary_point(support: Sequence[int], num_groups: int) -> torch.Tensor:
    """``(G,)`` float64 indicator of ``support``."""
    z = torch.zeros(num_groups, dtype=torch.float64)
    z[list(support)] = 1.0
    return z


# Time limits are wall-clock limits on a whole backend call (setup, model building and every
# solver call): the backends compute a deadline once and hand each step the time left. The warm
# start, the block-shift search and the root relaxation may each use this share of the time left.
SETUP_SHARE = 0.25


def deadline_of(begin: float, time_limit: float | None) -> float | None:
    """``begin + time_limit`` (``time.perf_counter`` clock), or None without a limit."""
    return None if time_limit is None else begin + time_limit


def time_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (may be negative), or None without one."""
    return None if deadline is None else deadline - time.perf_counter()


def _share(deadline: float | None) -> float | None:
    left = time_left(deadline)
    return None if left is None else max(SETUP_SHARE * left, 0.0)


class Stopwatch:
    """Running mean of the seconds one perspective-function evaluation (one cut) takes.

    A solver cannot be interrupted while a callback computes a cut, so before computing one the
    backends ask :meth:`fits` whether it can finish before the deadline.
    """

    def __init__(self) -> None:
        self.count, self.total = 0, 0.0

    def add(self, seconds: float) -> None:
        self.count, self.total = self.count + 1, self.total + seconds

    def fits(self, deadline: float | None) -> bool:
        if deadline is None:
            return True
        mean = self.total / self.count if self.count else 0.0
        return time.perf_counter() + mean < deadline


@dataclass
class Setup:
    """What both backends prepare before building a model."""

    fn: PerspectiveFunction
    incumbent: Incumbent
    relaxation_bound: float
    cuts: list[Cut] = field(default_factory=list)
    seconds: float = 0.0
    deadline: float | None = None
    stopwatch: Stopwatch = field(default_factory=Stopwatch)


def prepare(problem: LayerProblem, keep: int, common: CommonOptions, deadline: float | None = None) -> Setup:
    """Warm start, perspective function, incumbent and the root relaxation (bound and cuts).

    With a ``deadline`` the warm-start search, the block-shift search and the root relaxation each
    stop after a share (``SETUP_SHARE``) of the time left, so the solver gets the rest.
    """
    begin = time.perf_counter()
    start = warm_start(problem, keep, common.warm_start, time_limit=_share(deadline))
    relaxation_iterations = common.relaxation_iterations
    if common.shift == "block" and deadline is not None:
        shift = block_shift(problem, keep, time_limit=_share(deadline))[0]
    else:
        shift = make_shift(problem, common.shift, keep)
    fn = PerspectiveFunction(problem, shift)
    incumbent = Incumbent()
    stopwatch = Stopwatch()
    cuts: list[Cut] = []
    if start is not None:
        tick = time.perf_counter()
        z = binary_point(start, problem.num_groups).to(fn.K.device)
        value, grad = fn.value_and_grad(z)
        stopwatch.add(time.perf_counter() - tick)
        incumbent.offer(start, problem.loss(start))
        cuts.append(Cut(z, value, grad))
    result = relax(fn, keep, iterations=relaxation_iterations, keep_cuts=True, time_limit=_share(deadline))
    cuts.extend(result.cuts)
    # Without a warm start the incumbent is the rounded relaxation iterate, so that a solver stopped
    # by the time limit before its first feasible point still hands back a support of size keep.
    fallback = support_of(result.z, keep)
    incumbent.offer(fallback, problem.loss(fallback))
    return Setup(fn, incumbent, max(result.bound, 0.0), cuts, time.perf_counter() - begin, deadline, stopwatch)


def cut_coefficients(cut: Cut, c0: float) -> tuple[torch.Tensor, float]:
    """``(slope, constant)`` of ``eta >= slope . z + constant``, the cut in units of ``c0``."""
    return cut.grad / c0, (cut.value - float(cut.grad @ cut.z)) / c0


def start_vector(support: Sequence[int], num_groups: int) -> list[float]:
    """The MIP start of ``z``: 1.0 on ``support``, 0.0 elsewhere."""
    return binary_point(support, num_groups).tolist()


def binary_cut(fn: PerspectiveFunction, support: tuple[int, ...]) -> Cut:
    """The cut at the binary point of ``support`` (any number of groups): ``f`` and its gradient as
    ``fn.value_and_grad`` computes them there, on the kept columns only.

    At a binary point ``sqrt(z) = 0`` on the columns outside the support (and not always kept), so
    the factorization and the solve reduce to the kept columns ``S``: ``(K_SS + I) Y_S = C_S``,
    ``f = c0 - <C_S, Y_S>``, residual ``C - K_{:S} Y_S``. ``f`` at a support of ``keep`` groups is
    its loss.
    """
    z = binary_point(support, fn.num_groups).to(fn.K.device)
    columns = torch.nonzero(fn.column_z(z) > 0.5).flatten()
    C_S = fn.C_hat[columns]
    M = fn.K[columns][:, columns].clone()
    M.diagonal().add_(1.0)
    Y = torch.cholesky_solve(C_S, torch.linalg.cholesky(M))
    value = fn.c0 - float((C_S * Y).sum())
    residual = fn.C_hat - fn.K[:, columns] @ Y
    per_column = residual.square().sum(1)
    grad = torch.zeros(fn.num_groups, dtype=torch.float64, device=fn.K.device)
    grad.index_add_(0, fn.labels[~fn.always], -per_column[~fn.always])
    fn.evaluations += 1
    return Cut(z, value, grad)


def cut_from_binary(fn: PerspectiveFunction, support: Sequence[int], stopwatch: Stopwatch | None = None) -> Cut:
    """The cut at the binary point of ``support`` (its value is the support's loss), timed into
    ``stopwatch`` when given."""
    tick = time.perf_counter()
    cut = binary_cut(fn, tuple(support))
    if stopwatch is not None:
        stopwatch.add(time.perf_counter() - tick)
    return cut


def finish(setup: Setup, status: str, solver_bound: float | None, info: dict[str, Any]) -> SearchResult:
    """The SearchResult: best incumbent, best valid bound (never above the incumbent's loss)."""
    c0 = setup.fn.c0
    bounds = [setup.relaxation_bound]
    if solver_bound is not None and math.isfinite(solver_bound):
        bounds.append(safe_bound(solver_bound, c0))
    bound = max(bounds)
    if math.isfinite(setup.incumbent.loss):
        bound = min(bound, setup.incumbent.loss)
    info = dict(info)
    info.update({"relaxation_bound": setup.relaxation_bound, "visited": setup.incumbent.visited,
                 "shift": setup.fn.shift.kind})
    return SearchResult(setup.incumbent.support, status=status, lower_bound=bound, info=info)
