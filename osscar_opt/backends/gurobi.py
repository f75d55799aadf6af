"""``gurobi``: exact solutions with proven bounds from Gurobi (gurobipy).

Formulations (option ``formulation``; math in :mod:`osscar_opt.relaxation`):

- ``"outer-approximation"`` (default): binaries ``z`` (one per group) and one epigraph variable
  ``eta``; ``sum z = keep``; cuts ``eta >= f(z_t) + grad f(z_t) . (z - z_t)`` at the warm start and
  the relaxation iterates up front, then added lazily in a callback at every integer point Gurobi
  finds (``grad_g f = -||V_g||_F^2 / mu``). No quadratic terms and ``num_groups + 1`` variables,
  so it fits the size-limited licence of the pip wheel up to about 1999 groups.
- ``"miqp"``: the perspective mixed-integer program in whitened thin-factor variables ``W``
  (``p x r``, ``r = min(p, m)``): ``min tr(W^T K W) - 2 <Chat, W> + sum_g s_g`` with rotated
  cones ``||W_g||_F^2 <= s_g z_g``; ``p r + 2 G`` variables with quadratic terms.

Options: ``formulation``, ``time_limit`` (wall-clock seconds for the whole call: setup, model
building, the solve and the cut callbacks; when it runs out the status is "time_limit" with the
best bound proven so far), ``rel_gap`` / ``mip_gap`` (default 1e-6),
``threads``, ``warm_start`` (default True or "local-search": the local-search solution; "greedy";
False for none; or group ids), ``shift`` ("scalar" or "block"), ``env`` (a ``gurobipy.Env``),
``env_params`` (dict of environment / licence parameters such as ``WLSACCESSID``, ``WLSSECRET``,
``LICENSEID``), ``params`` (dict of extra model parameters), ``verbose``,
``relaxation_iterations``, ``size_check`` (default True: refuse, before building, a model the
size-limited licence cannot solve).
"""

from __future__ import annotations

import math
import time
from typing import Any

from osscar_opt.backends import _exact
from osscar_opt.backends._gurobi_licence import (
    LINEAR_LIMIT,
    QUADRATIC_LIMIT,
    SIZE_LIMIT_ERROR,
    GurobiSizeLimitError,
    environment,
    gurobipy,
    licence_is_restricted,
)
from osscar_opt.backends.base import Backend, SearchResult, check_options
from osscar_opt.problem import LayerProblem

OPTIONS = ("formulation", "time_limit", "rel_gap", "mip_gap", "threads", "warm_start", "shift", "env",
           "env_params", "params", "verbose", "relaxation_iterations", "size_check")


def size_limit_message(formulation: str, variables: int, constraints: int, quadratic: bool) -> str:
    """The error text for Gurobi error 10010: the limit, what to use instead, how to lift it."""
    kind = "with quadratic terms" if quadratic else "linear"
    advice = (
        "use formulation='outer-approximation' (one binary per group plus one variable, no quadratic terms; "
        f"fits this licence up to {LINEAR_LIMIT - 1} groups), or the 'scip' backend (open source, no size "
        "limit)" if formulation == "miqp" else
        "use the 'scip' backend (open source, no size limit), or osscar_opt.certify for a bound"
    )
    return (
        f"Gurobi error {SIZE_LIMIT_ERROR}: model too large for the size-limited licence that ships with the "
        f"gurobipy pip wheel (at most {LINEAR_LIMIT} variables and {LINEAR_LIMIT} linear constraints, and at most "
        f"{QUADRATIC_LIMIT} variables when the model has quadratic terms); this {formulation} model is {kind} with "
        f"{variables} variables and {constraints} constraints. Instead {advice}. A full Gurobi licence (commercial "
        "or free academic; pass env_params or set GRB_LICENSE_FILE) lifts the limit."
    )


def _status(model) -> str:
    GRB = gurobipy().GRB

    names = {GRB.OPTIMAL: "optimal", GRB.TIME_LIMIT: "time_limit", GRB.INTERRUPTED: "interrupted",
             GRB.NODE_LIMIT: "node_limit", GRB.SOLUTION_LIMIT: "solution_limit", GRB.WORK_LIMIT: "work_limit",
             GRB.SUBOPTIMAL: "suboptimal", GRB.NUMERIC: "numeric"}
    return names.get(model.Status, f"gurobi_status_{model.Status}")


def _objective_bound(model) -> float | None:
    try:
        bound = float(model.ObjBound)
    except Exception:  # noqa: BLE001 - no bound available (e.g. stopped before the root)
        return None
    return bound if math.isfinite(bound) else None


def _attribute(model, name: str, default: Any = 0) -> Any:
    """A model attribute, or ``default`` when Gurobi has none (e.g. optimize was not called)."""
    try:
        return getattr(model, name)
    except Exception:  # noqa: BLE001 - gurobipy raises AttributeError / GurobiError
        return default


def _set_parameters(model, options: dict[str, Any], rel_gap: float, remaining: float | None) -> None:
    model.Params.OutputFlag = 1 if options.get("verbose") else 0
    model.Params.MIPGap = rel_gap
    if remaining is not None:
        model.Params.TimeLimit = max(remaining, 0.0)
    if options.get("threads") is not None:
        threads = options["threads"]
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads: expected a non-negative integer, got {threads!r}")
        model.Params.Threads = threads
    params = options.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"params: expected a dict of Gurobi parameters, got {type(params).__name__}")
    for key, value in params.items():
        model.setParam(key, value)


def _add_cut(model, z, eta, cut: _exact.Cut, c0: float, lazy: bool = False) -> None:
    gp = gurobipy()

    slope, constant = _exact.cut_coefficients(cut, c0)
    expression = gp.LinExpr(slope.cpu().tolist(), list(z)) + constant
    if lazy:
        model.cbLazy(eta >= expression)
    else:
        model.addConstr(eta >= expression)


class GurobiBackend(Backend):
    """Exact MIP backend on Gurobi; status "optimal" / "time_limit" / ..., always a valid bound."""

    name = "gurobi"
    exact = True
    requires = ("gurobipy",)
    extra = "exact"
    options = OPTIONS

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
        check_options(self.name, options, OPTIONS)
        begin = time.perf_counter()  # the time limit counts from here, import included
        gurobipy()  # ImportError naming pip install 'osscar-opt[exact]' when gurobipy is missing
        common = _exact.common_options(options)
        formulation, time_limit = common.formulation, common.time_limit
        env, owned = environment(options)
        try:
            if formulation == "miqp" and options.get("size_check", True):
                self._check_size(env, problem, formulation)
            # time_limit bounds the whole call: setup, model building, the solve and the cut callbacks
            setup = _exact.prepare(problem, keep, common, _exact.deadline_of(begin, time_limit))
            runner = self._outer_approximation if formulation == "outer-approximation" else self._miqp
            status, bound, info = runner(env, problem, keep, setup, options, common.rel_gap)
        finally:
            if owned:
                env.dispose()
        info.update({"formulation": formulation, "setup_seconds": setup.seconds})
        return _exact.finish(setup, status, bound, info)

    # ------------------------------------------------------------------ size limit
    @staticmethod
    def _check_size(env, problem: LayerProblem, formulation: str) -> None:
        """Refuse, before building it, a MIQP the size-limited licence cannot solve."""
        r = min(problem.num_columns, problem.num_outputs)
        variables = problem.num_columns * r + 2 * problem.num_groups
        constraints = problem.num_groups + 1
        if variables > QUADRATIC_LIMIT and licence_is_restricted(env):
            raise GurobiSizeLimitError(size_limit_message(formulation, variables, constraints, True))

    @staticmethod
    def _optimize(model, formulation: str, quadratic: bool, callback=None) -> None:
        gp = gurobipy()

        try:
            model.optimize(callback) if callback is not None else model.optimize()
        except gp.GurobiError as exc:
            if exc.errno == SIZE_LIMIT_ERROR:
                model.update()
                raise GurobiSizeLimitError(
                    size_limit_message(formulation, model.NumVars, model.NumConstrs + model.NumQConstrs, quadratic)
                ) from exc
            raise

    # ------------------------------------------------------------------ outer approximation
    def _outer_approximation(self, env, problem, keep, setup, options, rel_gap):
        gp = gurobipy()
        GRB = gp.GRB

        fn, c0 = setup.fn, setup.fn.c0
        G = problem.num_groups
        with gp.Model("osscar-oa", env=env) as model:
            z = model.addVars(G, vtype=GRB.BINARY, name="z")
            z_list = [z[g] for g in range(G)]
            eta = model.addVar(lb=max(setup.relaxation_bound, 0.0) / c0 * (1 - 1e-9), name="eta")
            model.addConstr(gp.quicksum(z_list) == keep)
            for cut in setup.cuts:
                _add_cut(model, z_list, eta, cut, c0)
            model.setObjective(eta, GRB.MINIMIZE)
            if setup.incumbent.support or keep == 0:
                for g, value in enumerate(_exact.start_vector(setup.incumbent.support, G)):
                    z[g].Start = value
                eta.Start = setup.incumbent.loss / c0
            remaining = _exact.time_left(setup.deadline)  # after building the model: its time counts
            _set_parameters(model, options, rel_gap, remaining)
            model.Params.LazyConstraints = 1
            model.Params.IntFeasTol = 1e-9
            errors: list[BaseException] = []
            counters = {"lazy_cuts": 0, "out_of_time": False}

            def callback(model_, where):
                if where != GRB.Callback.MIPSOL or errors or counters["out_of_time"]:
                    return
                if not setup.stopwatch.fits(setup.deadline):
                    # Gurobi cannot stop while a callback computes a cut: stop before one that would
                    # end past the deadline (the bound so far stays valid: fewer cuts, a weaker master)
                    counters["out_of_time"] = True
                    model_.terminate()
                    return
                try:
                    values = model_.cbGetSolution(z_list)
                    support = _exact.support_of(values, keep)
                    cut = _exact.cut_from_binary(fn, support, setup.stopwatch)
                    setup.incumbent.offer(support, cut.value)
                    if model_.cbGetSolution(eta) < cut.value / c0 - 1e-10:
                        _add_cut(model_, z_list, eta, cut, c0, lazy=True)
                        counters["lazy_cuts"] += 1
                except BaseException as exc:  # noqa: BLE001 - re-raised after optimize
                    errors.append(exc)
                    model_.terminate()

            solved = remaining is None or remaining > 0
            if solved:
                self._optimize(model, "outer-approximation", False, callback)
            if errors:
                raise errors[0]
            if _attribute(model, "SolCount") > 0:
                support = _exact.support_of([z[g].X for g in range(G)], keep)
                setup.incumbent.offer(support, problem.loss(support))
            status = _status(model) if solved and not counters["out_of_time"] else "time_limit"
            bound = _objective_bound(model) if solved else None
            info = {"nodes": int(_attribute(model, "NodeCount")),
                    "cuts": len(setup.cuts) + counters["lazy_cuts"], "lazy_cuts": counters["lazy_cuts"]}
        return status, None if bound is None else bound * c0, info

    # ------------------------------------------------------------------ perspective MIQP
    def _miqp(self, env, problem, keep, setup, options, rel_gap):
        gp = gurobipy()
        GRB = gp.GRB

        fn, c0 = setup.fn, setup.fn.c0
        K = fn.K.clone()
        K[fn.always, fn.always] += 1.0  # always-kept columns: their shift is added back (z = 1)
        K = (0.5 * (K + K.T)).cpu().numpy()
        C = (fn.C_hat / math.sqrt(c0)).cpu().numpy()
        p, r = C.shape
        G = problem.num_groups
        with gp.Model("osscar-miqp", env=env) as model:
            W = model.addMVar((p, r), lb=-GRB.INFINITY, name="W")
            z = model.addMVar(G, vtype=GRB.BINARY, name="z")
            s = model.addMVar(G, lb=0.0, name="s")
            objective = (C * W).sum() * -2.0 + s.sum() + 1.0
            for j in range(r):
                objective = objective + W[:, j] @ K @ W[:, j]
            model.setObjective(objective, GRB.MINIMIZE)
            model.addConstr(z.sum() == keep)
            entries, binaries = W.tolist(), z.tolist()
            for g, cols in enumerate(problem.groups):
                block = W[cols.tolist(), :].reshape(-1)
                model.addConstr(block @ block <= s[g] * z[g])
                # z_g = 0 forces W_g = 0 exactly: the cone alone lets W_g leak within the QCP
                # tolerances, and the leak, times a large C, gave bounds percents below the optimum
                for column in cols.tolist():
                    for entry in entries[column]:
                        model.addGenConstrIndicator(binaries[g], False, entry == 0.0)
            if setup.incumbent.support or keep == 0:
                z.Start = _exact.start_vector(setup.incumbent.support, G)
            remaining = _exact.time_left(setup.deadline)  # after building the model: its time counts
            _set_parameters(model, options, rel_gap, remaining)
            solved = remaining is None or remaining > 0
            if solved:
                self._optimize(model, "miqp", True)
            if _attribute(model, "SolCount") > 0:
                support = _exact.support_of(z.X, keep)
                setup.incumbent.offer(support, problem.loss(support))
            status = _status(model) if solved else "time_limit"
            bound = _objective_bound(model) if solved else None
            info = {"nodes": int(_attribute(model, "NodeCount")), "variables": int(model.NumVars)}
        return status, None if bound is None else bound * c0, info
