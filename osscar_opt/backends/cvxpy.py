"""``cvxpy``: exact solutions with proven bounds through CVXPY and any installed mixed-integer solver.

Formulations (option ``formulation``; math in :mod:`osscar_opt.relaxation`):

- ``"outer-approximation"`` (default): a loop of MILP master problems ``min eta`` over binaries
  ``z`` with ``sum z = keep`` and the cuts ``eta >= f(z_t) + grad f(z_t) . (z - z_t)`` found so
  far (the warm start, the relaxation iterates, then every master optimum). Each master optimum
  is a valid lower bound; each master point is a feasible support (an incumbent). It stops when
  the incumbent is within ``rel_gap`` of the bound, or when a master repeats a point.
- ``"miqp"``: the perspective mixed-integer SOCP in whitened thin-factor variables ``W``
  (``p x r``) with ``cvxpy.quad_over_lin(W_g, z_g)`` perspective terms.

Options: ``formulation``, ``solver`` (default "SCIP"; any installed mixed-integer solver by name:
GUROBI, HIGHS / SCIPY / CBC / GLPK_MI for the OA master, MOSEK if licensed, ECOS_BB),
``time_limit`` (wall-clock seconds for the whole call, setup and every master included; when it
runs out the status is "time_limit" with the best bound proven so far), ``rel_gap`` / ``mip_gap``
(default 1e-6), ``warm_start`` (default: the
local-search solution; "greedy"; False for none; or group ids), ``shift``, ``verbose``,
``relaxation_iterations``, ``max_iterations`` (OA masters, default 500), ``solver_options`` (dict
passed to ``Problem.solve``).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np

from osscar_opt._extras import install_hint, require
from osscar_opt.backends import _exact
from osscar_opt.backends._gurobi_licence import GurobiSizeLimitError, default_licence_is_restricted
from osscar_opt.backends.base import Backend, SearchResult, check_options
from osscar_opt.problem import LayerProblem

OPTIONS = ("formulation", "solver", "time_limit", "rel_gap", "mip_gap", "warm_start", "shift", "verbose",
           "relaxation_iterations", "max_iterations", "solver_options", "max_variables")
# The MIQP form has p * r continuous variables and a dense p x p quadratic; past this CVXPY's
# canonicalization alone takes gigabytes (a real 384-column layer with r = 384 needs tens of GB).
MAX_MIQP_VARIABLES = 20_000

MILP_SOLVERS = ("SCIP", "GUROBI", "HIGHS", "SCIPY", "CBC", "GLPK_MI", "CPLEX", "MOSEK", "XPRESS", "COPT",
                "ECOS_BB")
MISOCP_SOLVERS = ("SCIP", "GUROBI", "MOSEK", "CPLEX", "XPRESS", "COPT", "ECOS_BB")
# Relative margin (in units of c0) for objective values reported by a solver with tolerances.
SOLVER_MARGIN = 1e-8
# Solvers that the "exact" extra installs (pyscipopt for SCIP, gurobipy for GUROBI).
EXTRA_SOLVERS = {"SCIP": "pyscipopt", "GUROBI": "gurobipy"}


def _cvxpy():
    """The cvxpy module; when it is not installed, an ImportError naming ``pip install 'osscar-opt[exact]'``."""
    return require("cvxpy", "exact", "the 'cvxpy' backend")


def check_solver(solver: Any, formulation: str) -> str:
    """The solver name, upper-cased; a missing or unsuitable one lists the installed suitable ones."""
    cp = _cvxpy()

    installed = set(cp.installed_solvers())
    suitable = MILP_SOLVERS if formulation == "outer-approximation" else MISOCP_SOLVERS
    kind = "mixed-integer LP" if formulation == "outer-approximation" else "mixed-integer SOCP"
    usable = [name for name in suitable if name in installed]
    if not isinstance(solver, str) or not solver:
        raise ValueError(f"solver: expected a solver name, got {solver!r}; installed {kind} solvers: {usable}")
    name = solver.upper()
    if name not in installed:
        hint = f" ({install_hint(EXTRA_SOLVERS[name], 'exact')})" if name in EXTRA_SOLVERS else ""
        raise ValueError(f"solver: {solver!r} is not installed{hint}; installed {kind} solvers for formulation "
                         f"{formulation!r}: {usable}")
    if name not in suitable:
        raise ValueError(f"solver: {solver!r} cannot solve the {kind} of formulation {formulation!r}; installed "
                         f"suitable solvers: {usable}")
    return name


# Per solver: (keyword that wraps the parameters or None, gap parameter, time parameter, least time).
SOLVER_PARAMETERS = {
    "SCIP": ("scip_params", "limits/gap", "limits/time", 0.01),
    "GUROBI": (None, "MIPGap", "TimeLimit", 0.0),
    "HIGHS": (None, "mip_rel_gap", "time_limit", 0.01),
    "SCIPY": ("scipy_options", "mip_rel_gap", "time_limit", 0.01),
}


def solver_arguments(solver: str, time_limit: float | None, gap: float) -> dict[str, Any]:
    """Time limit and relative MIP gap in the keyword arguments each solver understands."""
    if solver == "ECOS_BB":
        return {"mi_rel_eps": max(gap, 1e-9), "mi_abs_eps": 1e-12}
    if solver not in SOLVER_PARAMETERS:
        return {}
    wrapper, gap_name, time_name, least_time = SOLVER_PARAMETERS[solver]
    params: dict[str, Any] = {gap_name: gap}
    if time_limit is not None:
        params[time_name] = max(time_limit, least_time)
    return {wrapper: params} if wrapper else params


class CvxpyBackend(Backend):
    """Exact MIP backend through CVXPY (default solver SCIP); always returns a valid bound."""

    name = "cvxpy"
    exact = True
    requires = ("cvxpy",)
    extra = "exact"
    options = OPTIONS

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
        check_options(self.name, options, OPTIONS)
        begin = time.perf_counter()  # the time limit counts from here, import included
        _cvxpy()  # ImportError naming pip install 'osscar-opt[exact]' when cvxpy is missing
        common = _exact.common_options(options)
        formulation = common.formulation
        solver = check_solver(options.get("solver", "SCIP"), formulation)
        extra = options.get("solver_options") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"solver_options: expected a dict, got {type(extra).__name__}")
        if formulation == "miqp":
            limit = options.get("max_variables", MAX_MIQP_VARIABLES)
            variables = problem.num_columns * min(problem.num_columns, problem.num_outputs) + problem.num_groups
            if variables > limit:
                raise ValueError(
                    f"formulation: the miqp form of this layer has {variables} variables (more than max_variables="
                    f"{limit}) and a dense quadratic that CVXPY cannot build in reasonable memory; use "
                    "formulation='outer-approximation' (one binary per group) or osscar_opt.certify for a bound"
                )
        # time_limit bounds the whole call: setup, every master's compilation and solve, the cuts
        deadline = _exact.deadline_of(begin, common.time_limit)
        setup = _exact.prepare(problem, keep, common, deadline)
        settings = {"solver": solver, "verbose": bool(options.get("verbose", False)), "extra": extra,
                    "deadline": deadline, "rel_gap": common.rel_gap, "warnings": []}
        if formulation == "outer-approximation":
            max_iterations = _exact.check_count("max_iterations", options.get("max_iterations", 500))
            status, bound, info = self._outer_approximation(problem, keep, setup, settings, max_iterations)
        else:
            status, bound, info = self._miqp(problem, keep, setup, settings)
        info.update({"formulation": formulation, "solver": solver, "setup_seconds": setup.seconds})
        if settings["warnings"]:  # CVXPY's warnings (e.g. "Solution may be inaccurate"), kept off the terminal
            info["solver_warnings"] = "; ".join(settings["warnings"])
        return _exact.finish(setup, status, bound, info)

    @staticmethod
    def _run(problem_, settings: dict[str, Any], gap: float) -> str:
        """Solve a CVXPY problem within the deadline; returns CVXPY's status (or "time_limit"/"error").

        The solver gets the time left minus CVXPY's own overhead on the previous solve (compiling
        the problem is not on the solver's clock). CVXPY's warnings are recorded in
        ``settings["warnings"]`` instead of being printed.
        """
        cp = _cvxpy()

        remaining = _exact.time_left(settings["deadline"])
        if remaining is not None:
            remaining -= settings.get("overhead", 0.0)
            if remaining <= 0:
                return "time_limit"
        arguments = solver_arguments(settings["solver"], remaining, gap)
        for key, value in settings["extra"].items():  # solver_options; a parameter dict is merged, not replaced
            both = isinstance(value, dict) and isinstance(arguments.get(key), dict)
            arguments[key] = {**arguments[key], **value} if both else value
        tick = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                problem_.solve(solver=settings["solver"], verbose=settings["verbose"], **arguments)
        except cp.error.SolverError as exc:
            text = " ".join(str(part) for part in (exc, exc.__cause__, exc.__context__) if part is not None)
            if settings["solver"] == "GUROBI" and default_licence_is_restricted():
                raise GurobiSizeLimitError(
                    f"cvxpy backend, solver GUROBI: {text.strip()} The pip licence of gurobipy allows 2000 "
                    "variables and constraints (200 variables with quadratic or cone terms); use "
                    "formulation='outer-approximation', solver='SCIP', or a full Gurobi licence, which lifts it."
                ) from exc
            if settings["deadline"] is not None and time.perf_counter() >= settings["deadline"] - 0.05:
                return "time_limit"  # stopped by the time limit before finding a solution
            settings["last_error"] = text
            return "error"
        finally:
            for message in caught:
                note = " ".join(str(message.message).split())
                if note not in settings["warnings"]:
                    settings["warnings"].append(note)
        solve_time = getattr(getattr(problem_, "solver_stats", None), "solve_time", None)
        if isinstance(solve_time, int | float) and math.isfinite(solve_time):
            settings["overhead"] = max(0.0, time.perf_counter() - tick - float(solve_time))
        return str(problem_.status)

    @staticmethod
    def _stopped(outcome: str, raw_status: str | None, settings: dict[str, Any]) -> str:
        """The status of a solve that did not end optimal: "time_limit" when the time limit (or a
        user limit) stopped it, "inaccurate" for a solution CVXPY flags as inaccurate otherwise,
        else CVXPY's status ("error", "infeasible", ...)."""
        cp = _cvxpy()

        if outcome in ("time_limit", cp.USER_LIMIT) or raw_status in ("timelimit", "userinterrupt"):
            return "time_limit"
        if outcome in (cp.OPTIMAL_INACCURATE, cp.INFEASIBLE_INACCURATE, cp.UNBOUNDED_INACCURATE):
            left = _exact.time_left(settings["deadline"])
            return "time_limit" if left is not None and left <= 0.05 else "inaccurate"
        return outcome

    @staticmethod
    def _solver_report(problem_) -> tuple[str | None, float | None]:
        """``(solver status, proven dual bound in the solver's objective units)`` when the solver exposes them."""
        stats = getattr(problem_, "solver_stats", None)
        extra = getattr(stats, "extra_stats", None)
        try:
            if isinstance(extra, dict) and hasattr(extra.get("model"), "getDualbound"):  # SCIP
                return str(extra.get("scip_status")), float(extra["model"].getDualbound())
            if extra is not None and hasattr(extra, "ObjBound"):  # GUROBI
                status = {2: "optimal", 9: "timelimit"}.get(int(extra.Status), str(extra.Status))
                return status, float(extra.ObjBound)
        except Exception:  # noqa: BLE001 - no bound available
            return None, None
        return None, None

    # ------------------------------------------------------------------ outer approximation
    def _outer_approximation(self, problem, keep, setup, settings, max_iterations):
        cp = _cvxpy()

        fn, c0 = setup.fn, setup.fn.c0
        G = problem.num_groups
        coefficients = [_exact.cut_coefficients(cut, c0) for cut in setup.cuts]
        slopes = [slope.cpu().numpy() for slope, _ in coefficients]
        constants = [constant for _, constant in coefficients]
        z = cp.Variable(G, boolean=True)
        eta = cp.Variable()
        floor = max(setup.relaxation_bound, 0.0) / c0
        bound, status, seen = None, "iteration_limit", set()
        masters = 0
        for masters in range(1, max_iterations + 1):  # noqa: B007 - reported
            A, b = np.vstack(slopes), np.asarray(constants)
            master = cp.Problem(cp.Minimize(eta), [cp.sum(z) == keep, eta >= floor, eta >= A @ z + b])
            outcome = self._run(master, settings, 0.0)
            raw_status, dual = self._solver_report(master)
            if raw_status in ("optimal", "gaplimit"):
                outcome = cp.OPTIMAL
            if outcome not in (cp.OPTIMAL,):
                status = self._stopped(outcome, raw_status, settings)
                if dual is not None and math.isfinite(dual):  # the stopped master's proven bound still holds
                    bound = max(bound or -math.inf, dual * c0 - SOLVER_MARGIN * c0)
                if z.value is not None and outcome != "error":
                    support = _exact.support_of(z.value, keep)
                    setup.incumbent.offer(support, problem.loss(support))
                break
            value = float(master.value) if dual is None or not math.isfinite(dual) else min(dual, float(master.value))
            bound = max(bound or -math.inf, value * c0 - SOLVER_MARGIN * c0)
            support = _exact.support_of(z.value, keep)
            if not setup.stopwatch.fits(settings["deadline"]):  # no time for another cut and master
                setup.incumbent.offer(support, problem.loss(support))
                status = "time_limit"
                if setup.incumbent.loss - bound <= settings["rel_gap"] * setup.incumbent.loss:
                    status = "optimal"
                break
            cut = _exact.cut_from_binary(fn, support, setup.stopwatch)
            setup.incumbent.offer(support, cut.value)
            if setup.incumbent.loss - bound <= settings["rel_gap"] * setup.incumbent.loss or support in seen:
                status = "optimal"
                break
            seen.add(support)
            slope, constant = _exact.cut_coefficients(cut, c0)
            slopes.append(slope.cpu().numpy())
            constants.append(constant)
        info = {"masters": masters, "cuts": len(slopes)}
        if "last_error" in settings:
            info["error"] = settings["last_error"]
        return status, bound, info

    # ------------------------------------------------------------------ perspective MISOCP
    def _miqp(self, problem, keep, setup, settings):
        cp = _cvxpy()

        fn, c0 = setup.fn, setup.fn.c0
        K = fn.K.clone()
        K = 0.5 * (K + K.T)
        values, vectors = np.linalg.eigh(K.cpu().numpy())
        F = vectors * np.sqrt(np.clip(values, 0.0, None))  # K = F F^T
        C = (fn.C_hat / math.sqrt(c0)).cpu().numpy()
        p, r = C.shape
        always = fn.always.cpu().numpy()
        W = cp.Variable((p, r))
        z = cp.Variable(problem.num_groups, boolean=True)
        terms = [cp.sum_squares(F.T @ W), -2 * cp.sum(cp.multiply(C, W))]
        if always.any():
            terms.append(cp.sum_squares(W[np.flatnonzero(always), :]))
        terms += [cp.quad_over_lin(W[cols.cpu().numpy(), :], z[g]) for g, cols in enumerate(problem.groups)]
        model = cp.Problem(cp.Minimize(cp.sum(terms)), [cp.sum(z) == keep])  # + 1 (= c0 / c0) added below
        if setup.incumbent.support:
            z.value = np.asarray(_exact.start_vector(setup.incumbent.support, problem.num_groups))
        outcome = self._run(model, settings, settings["rel_gap"])
        raw_status, dual = self._solver_report(model)
        bound = None
        if dual is not None and math.isfinite(dual):
            bound = (dual + 1.0) * c0 - SOLVER_MARGIN * c0
            if raw_status in ("optimal", "gaplimit"):
                outcome = cp.OPTIMAL
            elif raw_status == "timelimit":
                outcome = "time_limit"
        if z.value is not None and outcome != "error":
            support = _exact.support_of(z.value, keep)
            setup.incumbent.offer(support, problem.loss(support))
        if outcome == cp.OPTIMAL:
            status = "optimal"
            if bound is None:  # the solver's objective (cvxpy's re-evaluation divides by z_g = 0)
                value = getattr(getattr(model, "solution", None), "opt_val", None)
                value = float(model.value) if value is None else float(value)
                if math.isfinite(value):
                    bound = (value + 1.0) * c0 * (1.0 - settings["rel_gap"]) - SOLVER_MARGIN * c0
        else:
            status = self._stopped(outcome, raw_status, settings)
        info = {"variables": int(p * r + problem.num_groups)}
        if "last_error" in settings:
            info["error"] = settings["last_error"]
        return status, bound, info
