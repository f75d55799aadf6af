"""Certified optimality gaps without integer variables (docs/architecture.md, "Relaxations and bounds").

``certify(problem, solution)`` lower-bounds the optimal loss of ``problem`` at the solution's
budget by the continuous relaxation of the perspective formulation, minimized over
``{0 <= z <= 1, sum z <= keep}`` in torch (projected gradient or Frank-Wolfe; every iterate
gives a valid bound from its linearization, see :mod:`osscar_opt.relaxation`), and
reports the certified gap ``(loss - bound) / loss`` of the solution. It scales to thousands of
groups (one ``p x p`` Cholesky per iteration).

Shifts: "scalar" (``mu = lambda_min(H)``); "diagonal" and "block": the diagonal or block-diagonal
``D`` that maximizes the bound (the SDP bound of the perspective relaxation, found by a barrier
method, see :func:`~osscar_opt.relaxation.block_shift`; never weaker than the scalar one); or
"both" (scalar and block, and how much of the scalar gap the block shift closes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from osscar_opt.problem import LayerProblem
from osscar_opt.relaxation import PerspectiveFunction, block_shift, relax
from osscar_opt.solution import Solution

SHIFT_CHOICES = ("scalar", "diagonal", "block", "both")


@dataclass
class Certificate:
    """A proven lower bound for one problem and budget, and the certified gap of a solution.

    Attributes:
        keep: the budget.
        support: the certified solution's kept groups.
        loss: the solution's loss (recomputed from scratch).
        lower_bound: the best proven lower bound on the optimal loss (loss units).
        gap: ``(loss - lower_bound) / loss`` (0 when loss is 0).
        bounds: bound per shift tried ({"scalar": ..., "block": ...}).
        tightening: for "both", ``(gap_scalar - gap_block) / gap_scalar`` (share of the scalar gap
            closed by the block shift), else None.
        history: best bound after every iteration of the last relaxation (non-decreasing).
        iterations, seconds: work done.
    """

    keep: int
    support: tuple[int, ...]
    loss: float
    lower_bound: float
    gap: float
    bounds: dict[str, float] = field(default_factory=dict)
    tightening: float | None = None
    history: list[float] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "keep": self.keep, "support": list(self.support), "loss": self.loss, "lower_bound": self.lower_bound,
            "gap": self.gap, "bounds": dict(self.bounds), "tightening": self.tightening,
            "iterations": self.iterations, "seconds": self.seconds,
        }


def _gap(loss: float, bound: float) -> float:
    return 0.0 if loss <= 0 else max(0.0, (loss - bound) / loss)


def _resolve(
    problem: LayerProblem, solution: Solution | Sequence[int], keep: int | None
) -> tuple[tuple[int, ...], int]:
    """The support and budget from a Solution or a support (``keep`` defaults to its size)."""
    if isinstance(solution, Solution):
        support = problem.check_support(solution.support, "solution")
        budget = solution.keep if keep is None else keep
    else:
        support = problem.check_support(solution, "solution")
        budget = len(support) if keep is None else keep
    if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= problem.num_groups:
        raise ValueError(f"keep: expected an integer in [0, {problem.num_groups}], got {budget!r}")
    if len(support) > budget:
        raise ValueError(f"solution: keeps {len(support)} groups, more than keep={budget}")
    return support, budget


def certify(
    problem: LayerProblem,
    solution: Solution | Sequence[int],
    keep: int | None = None,
    *,
    shift: str = "scalar",
    iterations: int = 200,
    method: str = "projected-gradient",
    time_limit: float | None = None,
    shift_iterations: int = 40,
) -> Certificate:
    """Certify ``solution`` (a :class:`Solution` or kept group ids) with a proven lower bound.

    Args:
        problem: the layer problem.
        solution: the solution to certify; its budget is ``solution.keep`` / ``len(support)``
            unless ``keep`` is given.
        shift: "scalar" (``lambda_min(H) I``), "diagonal" (the diagonal ``D`` that maximizes the
            bound), "block" (the block-diagonal ``D`` over the groups that maximizes it; the same
            as "diagonal" for single-column groups), or "both" (scalar and block, and how much of
            the scalar gap the block shift closes).
        iterations: relaxation iterations (each one ``p x p`` Cholesky).
        method: "projected-gradient" or "frank-wolfe".
        time_limit: seconds for the shift search plus the final relaxation (every bound so far is
            still valid when it runs out).
        shift_iterations: steps of the shift search (:func:`~osscar_opt.relaxation.block_shift`;
            each about 30 relaxation iterations).
    """
    if not isinstance(problem, LayerProblem):
        raise ValueError(f"problem: expected a LayerProblem, got {type(problem).__name__}")
    if shift not in SHIFT_CHOICES:
        raise ValueError(f"shift: expected one of {SHIFT_CHOICES}, got {shift!r}")
    if isinstance(shift_iterations, bool) or not isinstance(shift_iterations, int) or shift_iterations < 0:
        raise ValueError(f"shift_iterations: expected a non-negative integer, got {shift_iterations!r}")
    begin = time.perf_counter()
    support, budget = _resolve(problem, solution, keep)
    loss = problem.loss(support)
    if budget in (0, problem.num_groups):
        optimum = problem.loss(range(budget))
        return Certificate(budget, support, loss, optimum, _gap(loss, optimum), {shift: optimum},
                           seconds=time.perf_counter() - begin)
    bounds: dict[str, float] = {}
    result = None
    if shift in ("scalar", "both"):
        result = relax(PerspectiveFunction(problem, "scalar"), budget, iterations=iterations, method=method,
                       start=support, time_limit=time_limit)
        bounds["scalar"] = result.bound
    if shift != "scalar":
        pattern = "block" if shift == "both" else shift
        left = None if time_limit is None else max(time_limit - (time.perf_counter() - begin), 0.0)
        tuned, _ = block_shift(problem, budget, pattern=pattern, iterations=shift_iterations,
                               time_limit=None if left is None else 0.7 * left)
        left = None if time_limit is None else max(time_limit - (time.perf_counter() - begin), 1e-3)
        result = relax(PerspectiveFunction(problem, tuned), budget, iterations=iterations, method=method,
                       start=support, time_limit=left)
        bounds[pattern] = max(result.bound, bounds.get("scalar", -float("inf")))
    bound = min(max(bounds.values()), loss)
    tightening = None
    if shift == "both":
        scalar_gap, block_gap = _gap(loss, bounds["scalar"]), _gap(loss, bounds["block"])
        tightening = 0.0 if scalar_gap <= 0 else (scalar_gap - block_gap) / scalar_gap
    return Certificate(budget, support, loss, bound, _gap(loss, bound), bounds, tightening, list(result.history),
                       result.iterations, time.perf_counter() - begin)


def certify_task(problem: LayerProblem, spec: dict[str, Any]) -> dict[str, Any]:
    """One (problem, keep) of ``osscar certify`` as a batch task (:mod:`osscar_opt.batch`): the
    heuristic's solution, its certificate, and each exact backend's result, as plain data.

    ``spec``: ``keep``, ``heuristic`` (backend name), ``exact`` (``[name, formulation]`` pairs),
    ``options`` (for the exact backends; ``time_limit`` also bounds the relaxation), ``shift``,
    ``iterations``. An exact backend that fails gets ``{"status": "error", "error", "seconds"}``
    in ``exact``; a failing heuristic or bound fails the task.
    """
    from osscar_opt import solving
    from osscar_opt.plain import plain

    begin = time.perf_counter()
    keep, options = spec["keep"], dict(spec["options"])
    found = solving.solve(problem, keep, spec["heuristic"])
    certificate = certify(problem, found, shift=spec["shift"], iterations=spec["iterations"],
                          time_limit=options.get("time_limit"))
    exact: dict[str, dict[str, Any]] = {}
    for name, formulation in spec["exact"]:
        label, tick = f"{name}:{formulation}", time.perf_counter()
        try:
            solution = solving.solve(problem, keep, name, formulation=formulation, warm_start=list(found.support),
                                     **options)
        except Exception as exc:  # noqa: BLE001 - recorded (a licence limit, a solver failure)
            message = " ".join(str(exc).split())
            text = message if isinstance(exc, ValueError | ImportError | OSError) and message \
                else f"{type(exc).__name__}: {message}"
            exact[label] = {"status": "error", "error": text, "seconds": time.perf_counter() - tick}
            continue
        exact[label] = {"loss": solution.loss, "lower_bound": solution.lower_bound, "gap": solution.gap,
                        "status": solution.status, "seconds": solution.seconds, "support": list(solution.support),
                        "info": plain(solution.info)}
        if "solver_warnings" in solution.info:
            exact[label]["note"] = str(solution.info["solver_warnings"])
    return {"heuristic_loss": found.loss, "heuristic_seconds": found.seconds, "heuristic_support": list(found.support),
            "bound": certificate.lower_bound, "bounds": dict(certificate.bounds), "certified_gap": certificate.gap,
            "certify_seconds": certificate.seconds, "exact": exact, "c0": problem.c0,
            "seconds": time.perf_counter() - begin}
