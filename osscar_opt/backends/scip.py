"""``scip``: exact solutions with proven bounds from SCIP (pyscipopt), in one branch-and-cut tree.

The open counterpart of the ``gurobi`` backend's outer approximation (math in
:mod:`osscar_opt.relaxation`): binaries ``z`` (one per group), one epigraph variable ``eta``,
``sum z = keep``, objective ``min eta`` in units of ``c0`` with ``eta >= relaxation bound``, and
the cuts ``eta >= f(z_t) + grad f(z_t) . (z - z_t)`` of the convex, non-increasing perspective
function ``f``: at the warm start and the relaxation iterates up front, then from a constraint
handler inside SCIP's single search tree (where the ``cvxpy`` backend re-solves one MILP master
per cut):

- enforcement (``consenfolp`` / ``consenfops``) and checking (``conscheck``): at every integer
  point SCIP reaches, the cut at its support is added as a linear constraint when ``eta`` lies
  below ``f``; every support evaluated is offered to the incumbent with its exact loss, and one
  better than SCIP's best solution is handed to SCIP (a primal heuristic, ``trySol``);
- separation (``conssepalp``) at every node, option ``upper_cuts`` (default True): the cut at the
  node's upper-bound point ``u`` (the groups not fixed to 0). ``f`` is non-increasing and every
  ``z`` of the node has ``z <= u``, so the cut gives the node at least ``f(u)``, the loss of the
  largest support it allows (the "leaps and bounds" bound of best-subset selection), and more
  through its slopes. On real layers the perspective relaxation alone is too weak to prune (its
  bound can be 80% below the optimum), and this cut is what spares most supports;
- option ``fractional_cuts`` (default False): also the tangent of ``f`` at fractional LP points
  (valid: ``f`` is convex on ``[0, 1]^G``), at most 10 rounds per node. It tightens nodes towards
  the perspective relaxation, but on the MiniLM head layers it costs more evaluations (each a full
  ``p x p`` factorization) than it saves.

Cuts at binary points are computed on the kept columns only (:func:`_exact.binary_cut`, shared
with the other exact backends; the same ``f`` and gradient as
:meth:`PerspectiveFunction.value_and_grad`, several times cheaper); each support is evaluated
once (cached). Presolving is off (a model of ``G + 1`` variables) and dual reductions
are disallowed (the handler's constraint is not visible to them).

Options: ``formulation`` (only ``"outer-approximation"``), ``time_limit`` (wall-clock seconds for
the whole call: setup, model building, the solve and the cut callbacks; when it runs out the
status is "time_limit" with the best bound proven so far), ``rel_gap`` / ``mip_gap`` (default
1e-6), ``warm_start`` (default True or "local-search": the local-search solution; "greedy"; False
for none; or group ids), ``shift`` ("scalar" or "block"), ``verbose`` (SCIP's log),
``relaxation_iterations``, ``upper_cuts``, ``fractional_cuts``, ``params`` (dict of extra SCIP
parameters, e.g. ``{"limits/nodes": 1000}``).

The status is "optimal" only when SCIP ends its search (optimal, or its gap limit ``rel_gap``) and
the exactly re-evaluated incumbent is within ``rel_gap`` of SCIP's dual bound ("inaccurate"
otherwise).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from osscar_opt._extras import require
from osscar_opt.backends import _exact
from osscar_opt.backends.base import Backend, SearchResult, check_options
from osscar_opt.problem import LayerProblem
from osscar_opt.relaxation import Cut

binary_cut = _exact.binary_cut  # module name kept: the cut every search step computes

OPTIONS = ("formulation", "time_limit", "rel_gap", "mip_gap", "warm_start", "shift", "verbose",
           "relaxation_iterations", "upper_cuts", "fractional_cuts", "params")

# SCIP's feasibility tolerance (the objective is in units of c0, so about relative to c0). Smaller
# values make SCIP retry unstable LPs at 1e-3 of it, below what SoPlex allows, and SoPlex prints a
# warning on stdout each time.
FEASTOL = 1e-7
# An integer point with ``eta < f / c0 - VIOLATION`` is rejected and gets its cut (once).
VIOLATION = 1e-9
# A node's cut is added when the LP point violates it by more than this (relative to f / c0, and
# above FEASTOL, so that a cut the LP already has is never added again).
SEPARATION = 1e-6
FRACTIONAL_ROUNDS = 10  # fractional-point rounds per node (Kelley's method converges slowly)
INTEGRAL = 1e-6  # a solution's z within this of 0 or 1 counts as binary
HANDLER = "osscar_oa"

_STATUS = {"optimal": "optimal", "gaplimit": "optimal", "timelimit": "time_limit", "userinterrupt": "interrupted",
           "nodelimit": "node_limit", "totalnodelimit": "node_limit", "stallnodelimit": "node_limit",
           "sollimit": "solution_limit", "bestsollimit": "solution_limit", "memlimit": "memory_limit"}


def _pyscipopt():
    """The pyscipopt module; when it is not installed, an ImportError naming ``pip install 'osscar-opt[exact]'``."""
    return require("pyscipopt", "exact", "the 'scip' backend")


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def _check_params(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ValueError(f"params: expected a dict of SCIP parameters (name -> value), got {value!r}")
    return value


def _solution(model, z, eta, support, eta_value: float, heur=None, stored: bool = False) -> bool:
    """Hand SCIP the point ``z`` = indicator of ``support``, ``eta = eta_value``: tried at once while
    solving, or ``stored`` before the solve (checked when it starts)."""
    solution = model.createSol(heur)
    chosen = set(support)
    for g, var in enumerate(z):
        model.setSolVal(solution, var, 1.0 if g in chosen else 0.0)
    model.setSolVal(solution, eta, eta_value)
    if stored:
        return bool(model.addSol(solution, free=True))
    return bool(model.trySol(solution, printreason=False, free=True))


class _Search:
    """What the constraint handler and the heuristic share: the model, cuts seen, counters, errors.

    A Python exception inside a SCIP callback cannot propagate through SCIP: each callback records
    it, interrupts the solve and answers conservatively; the backend re-raises it after the solve.
    """

    def __init__(self, model, z, eta, keep: int, setup: _exact.Setup, upper: bool, fractional: bool) -> None:
        self.model, self.z, self.eta, self.keep, self.setup = model, z, eta, keep, setup
        self.fn, self.c0 = setup.fn, setup.fn.c0
        self.upper, self.fractional = upper, fractional
        self.cache: dict[tuple[int, ...], Cut] = {}  # group ids -> cut at their binary point
        self.added: set[tuple[int, ...]] = set()  # supports whose cut is a constraint of the model
        self.pending: list[tuple[int, ...]] = []  # violated supports conscheck saw, cut not added yet
        self.better: list[tuple[int, ...]] = []  # supports to hand to SCIP as solutions
        self.best_passed = setup.incumbent.loss
        self.rounds: dict[int, int] = {}  # node number -> fractional rounds
        self.tz: list | None = None  # the transformed z and eta: local bounds, rows
        self.teta = None
        self.errors: list[BaseException] = []
        self.out_of_time = False
        self.counters = {"lazy_cuts": 0, "upper_cuts": 0, "fractional_cuts": 0, "evaluations": 0,
                         "solutions_passed": 0}

    # ---------------------------------------------------------------- evaluations
    def fits(self) -> bool:
        """Time for one more evaluation of ``f``; else interrupt SCIP (the bound so far stays valid).

        SCIP cannot stop while a callback computes a cut: stop before one that would end past the
        deadline."""
        if not self.out_of_time and not self.setup.stopwatch.fits(self.setup.deadline):
            self.out_of_time = True
            self.model.interruptSolve()
        return not self.out_of_time

    def values(self, solution) -> list[float]:
        return [self.model.getSolVal(solution, var) for var in self.z]

    def transformed(self) -> list:
        if self.tz is None:
            self.tz = [self.model.getTransformedVar(var) for var in self.z]
            self.teta = self.model.getTransformedVar(self.eta)
        return self.tz

    def cut_at(self, groups: tuple[int, ...]) -> Cut:
        """The cut at the binary point of ``groups`` (cached); a support of ``keep`` groups is
        offered to the incumbent with its exact loss."""
        cut = self.cache.get(groups)
        if cut is None:
            tick = time.perf_counter()
            cut = binary_cut(self.fn, groups)
            self.setup.stopwatch.add(time.perf_counter() - tick)
            self.counters["evaluations"] += 1
            self.cache[groups] = cut
            if len(groups) == self.keep:
                self.setup.incumbent.offer(groups, cut.value)
                if cut.value < self.best_passed:
                    self.better.append(groups)
        return cut

    def violated(self, eta_value: float, cut: Cut) -> bool:
        return eta_value < cut.value / self.c0 - VIOLATION

    # ---------------------------------------------------------------- cuts
    def add_constraint(self, cut: Cut) -> None:
        """The cut as a global linear constraint ``eta - slope . z >= constant`` (never removed)."""
        quicksum = _pyscipopt().quicksum
        slope, constant = _exact.cut_coefficients(cut, self.c0)
        terms = quicksum(-a * var for a, var in zip(slope.tolist(), self.z, strict=True) if a != 0.0)
        self.model.addCons(self.eta + terms >= constant, name=f"oa{len(self.added)}", removable=False)

    def add_row(self, cut: Cut) -> bool:
        """A node's cut as a globally valid row (kept in the global cut pool); True: node infeasible."""
        slope, constant = _exact.cut_coefficients(cut, self.c0)
        tz = self.transformed()
        row = self.model.createEmptyRowUnspec(name="oa_node", lhs=constant, rhs=None, local=False, removable=True)
        self.model.cacheRowExtensions(row)
        self.model.addVarToRow(row, self.teta, 1.0)
        for a, var in zip(slope.tolist(), tz, strict=True):
            if a != 0.0:
                self.model.addVarToRow(row, var, -a)
        self.model.flushRowExtensions(row)
        infeasible = self.model.addCut(row, forcecut=False)
        self.model.addPoolCut(row)
        self.model.releaseRow(row)
        return infeasible

    def add_support_cut(self, support: tuple[int, ...]) -> bool:
        if support in self.added:
            return False
        self.add_constraint(self.cache[support])
        self.added.add(support)
        self.counters["lazy_cuts"] += 1
        return True

    def add_pending(self) -> int:
        """Constraints for the violated supports conscheck saw (their ``f`` is known already)."""
        count = sum(self.add_support_cut(support) for support in self.pending)
        self.pending.clear()
        return count

    def separates(self, eta_value: float, value: float) -> bool:
        return eta_value < value / self.c0 - max(SEPARATION * value / self.c0, 10 * FEASTOL)

    # ---------------------------------------------------------------- callbacks
    def guarded(self, action, failed):
        """``action()``, or ``failed`` after recording an error and interrupting SCIP."""
        if self.errors:
            return failed
        try:
            return action()
        except BaseException as exc:  # noqa: BLE001 - re-raised after the solve
            self.errors.append(exc)
            self.model.interruptSolve()
            return failed

    def enforce(self) -> dict[str, Any]:
        """An integral LP or pseudo solution: its cut when ``eta`` lies below ``f``, else feasible."""
        result = _pyscipopt().SCIP_RESULT

        added = self.add_pending()
        support = _exact.support_of(self.values(None), self.keep)
        if support not in self.cache:
            # past the deadline SCIP stops after this node; the cut is still computed (one evaluation
            # late): accepting the point unchecked would end its node with a value that is not f
            self.fits()
        cut = self.cut_at(support)
        if self.violated(self.model.getSolVal(None, self.eta), cut):
            # a point violating a cut the model has already satisfies it within SCIP's tolerance:
            # its node ends with that LP value, a valid lower bound
            added += self.add_support_cut(support)
        return {"result": result.CONSADDED if added else result.FEASIBLE}

    def check(self, solution) -> dict[str, Any]:
        result = _pyscipopt().SCIP_RESULT

        values = self.values(solution)
        if any(min(v, 1.0 - v) > INTEGRAL for v in values):
            return {"result": result.INFEASIBLE}
        support = _exact.support_of(values, self.keep)
        if support not in self.cache and not self.fits():
            return {"result": result.INFEASIBLE}  # not checked: rejecting is always safe
        if self.violated(self.model.getSolVal(solution, self.eta), self.cut_at(support)):
            if support not in self.added:
                self.pending.append(support)
            return {"result": result.INFEASIBLE}
        return {"result": result.FEASIBLE}

    def separate(self) -> dict[str, Any]:
        """Pending cuts; the cut at the node's upper-bound point; the tangent at a fractional LP point."""
        result = _pyscipopt().SCIP_RESULT

        if self.add_pending():
            return {"result": result.CONSADDED}
        eta_value = self.model.getSolVal(None, self.eta)
        if self.upper:
            # f is non-increasing and z <= u on this node: the cut at u gives it at least f(u)
            upper = tuple(g for g, var in enumerate(self.transformed()) if var.getUbLocal() > 0.5)
            if len(upper) > self.keep and (upper in self.cache or self.fits()):
                cut = self.cut_at(upper)
                if self.separates(eta_value, cut.value):
                    self.counters["upper_cuts"] += 1
                    return {"result": result.CUTOFF if self.add_row(cut) else result.SEPARATED}
        if not self.fractional:
            return {"result": result.DIDNOTFIND}
        node = self.model.getCurrentNode().getNumber()
        self.rounds[node] = self.rounds.get(node, 0) + 1
        values = [min(max(v, 0.0), 1.0) for v in self.values(None)]
        if self.rounds[node] > FRACTIONAL_ROUNDS or all(min(v, 1.0 - v) <= INTEGRAL for v in values):
            return {"result": result.DIDNOTFIND}  # an integral point is enforcement's business
        if not self.fits():
            return {"result": result.DIDNOTRUN}
        tick = time.perf_counter()
        point = torch.tensor(values, dtype=torch.float64, device=self.fn.K.device)
        value, grad = self.fn.value_and_grad(point)
        self.setup.stopwatch.add(time.perf_counter() - tick)
        self.counters["evaluations"] += 1
        if not self.separates(eta_value, value):
            return {"result": result.DIDNOTFIND}
        self.counters["fractional_cuts"] += 1
        return {"result": result.CUTOFF if self.add_row(Cut(point, value, grad)) else result.SEPARATED}

    def pass_solutions(self, heur) -> dict[str, Any]:
        """Hand SCIP the supports better than its best solution, with ``eta = f / c0``."""
        result = _pyscipopt().SCIP_RESULT

        found = False
        for support in self.better:
            loss = self.cache[support].value
            if loss < self.best_passed and _solution(self.model, self.z, self.eta, support, loss / self.c0, heur):
                found = True
                self.best_passed = loss
                self.counters["solutions_passed"] += 1
        self.better.clear()
        return {"result": result.FOUNDSOL if found else result.DIDNOTFIND}


def _plugins(search: _Search):
    """The constraint handler and the heuristic, as pyscipopt classes (pyscipopt imported lazily)."""
    scip = _pyscipopt()
    result = scip.SCIP_RESULT

    class OuterApproximation(scip.Conshdlr):
        """``eta >= f(z)``: enforced and checked at integer points, separated at every node."""

        def consenfolp(self, constraints, nusefulconss, solinfeasible):
            return search.guarded(search.enforce, {"result": result.FEASIBLE})

        def consenfops(self, constraints, nusefulconss, solinfeasible, objinfeasible):
            return search.guarded(search.enforce, {"result": result.FEASIBLE})

        def conscheck(self, constraints, solution, checkintegrality, checklprows, printreason, completely):
            return search.guarded(lambda: search.check(solution), {"result": result.INFEASIBLE})

        def conssepalp(self, constraints, nusefulconss):
            return search.guarded(search.separate, {"result": result.DIDNOTRUN})

        def conslock(self, constraint, locktype, nlockspos, nlocksneg):
            # eta >= c + g . z: lowering eta or any z_g may violate it; lock every variable both ways
            both = nlockspos + nlocksneg
            for var in (*search.z, search.eta):
                self.model.addVarLocksType(var, locktype, both, both)

    class PassSolutions(scip.Heur):
        """Hands SCIP the supports the handler found better than its best solution."""

        def heurexec(self, heurtiming, nodeinfeasible):
            return search.guarded(lambda: search.pass_solutions(self), {"result": result.DIDNOTRUN})

    return OuterApproximation(), PassSolutions()


class ScipBackend(Backend):
    """Exact branch-and-cut backend on SCIP; status "optimal" / "time_limit" / ..., always a valid bound."""

    name = "scip"
    exact = True
    requires = ("pyscipopt",)
    extra = "exact"
    options = OPTIONS

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
        check_options(self.name, options, OPTIONS)
        begin = time.perf_counter()  # the time limit counts from here, import included
        _pyscipopt()  # ImportError naming pip install 'osscar-opt[exact]' when pyscipopt is missing
        common = _exact.common_options(options)
        if common.formulation != "outer-approximation":
            raise ValueError(f"formulation: the 'scip' backend solves only 'outer-approximation', got "
                             f"{options['formulation']!r}; the perspective MIQP is in the 'gurobi' and 'cvxpy' "
                             "backends")
        upper = _check_flag("upper_cuts", options.get("upper_cuts", True))
        fractional = _check_flag("fractional_cuts", options.get("fractional_cuts", False))
        model = self._model(bool(options.get("verbose", False)), common.rel_gap, _check_params(options.get("params")))
        try:
            # time_limit bounds the whole call: setup, model building, the solve and the cut callbacks
            setup = _exact.prepare(problem, keep, common, _exact.deadline_of(begin, common.time_limit))
            status, bound, info = self._outer_approximation(model, problem, keep, setup, upper, fractional,
                                                            common.rel_gap)
        finally:
            model.freeProb()
        info.update({"formulation": "outer-approximation", "setup_seconds": setup.seconds})
        return _exact.finish(setup, status, bound, info)

    @staticmethod
    def _model(verbose: bool, rel_gap: float, params: dict[str, Any]):
        """An empty SCIP model with this backend's settings and the ``params`` (checked here, before any work)."""
        scip = _pyscipopt()
        model = scip.Model("osscar-oa")
        if not verbose:
            model.hideOutput()
        model.setParam("limits/gap", rel_gap)
        model.setParam("limits/absgap", 0.0)
        model.setParam("numerics/feastol", FEASTOL)
        # G + 1 variables: presolving only costs time; dual reductions cannot see the handler's constraint
        model.setPresolve(scip.SCIP_PARAMSETTING.OFF)
        model.setParam("misc/allowstrongdualreds", False)
        model.setParam("misc/allowweakdualreds", False)
        for key, value in params.items():
            try:
                model.setParam(key, value)
            except Exception as exc:  # noqa: BLE001 - pyscipopt raises KeyError / ValueError / TypeError
                model.freeProb()
                raise ValueError(f"params: SCIP refuses {key}={value!r}: {exc}") from None
        return model

    def _outer_approximation(self, model, problem, keep, setup, upper, fractional, rel_gap):
        scip = _pyscipopt()
        c0, G = setup.fn.c0, problem.num_groups
        z = [model.addVar(name=f"z{g}", vtype="B") for g in range(G)]
        eta = model.addVar(name="eta", vtype="C", lb=max(setup.relaxation_bound, 0.0) / c0 * (1 - 1e-9), ub=None,
                           obj=1.0)
        model.setMinimize()
        model.addCons(scip.quicksum(z) == keep, name="keep")
        search = _Search(model, z, eta, keep, setup, upper, fractional)
        for cut in setup.cuts:
            search.add_constraint(cut)
            point = cut.z.cpu()
            if bool(((point == 0) | (point == 1)).all()):  # the warm start's cut: known, and in the model
                support = tuple(int(g) for g in torch.nonzero(point).flatten())
                search.cache[support] = cut
                search.added.add(support)
        handler, heuristic = _plugins(search)
        # enforcement after integrality (negative priority): it sees integer points only
        model.includeConshdlr(handler, HANDLER, "eta >= f(z), f the perspective function", sepapriority=1,
                              enfopriority=-1, chckpriority=-1, sepafreq=1, propfreq=-1, eagerfreq=-1,
                              maxprerounds=0, needscons=False)
        timing = scip.SCIP_HEURTIMING.AFTERLPNODE | scip.SCIP_HEURTIMING.AFTERPSEUDONODE
        model.includeHeur(heuristic, "osscar_pass", "supports found by the OA handler", "O", priority=1_000_000,
                          freq=1, timingmask=timing)
        remaining = _exact.time_left(setup.deadline)  # after building the model: its time counts
        solved = remaining is None or remaining > 0
        if solved:
            if remaining is not None:
                model.setParam("limits/time", max(remaining, 0.01))
            if setup.incumbent.support:
                _solution(model, z, eta, setup.incumbent.support, setup.incumbent.loss / c0, stored=True)
            model.optimize()
        if search.errors:
            raise search.errors[0]
        raw, bound, nodes = "timelimit", None, 0
        if solved:
            if model.getNSols() > 0:
                best = model.getBestSol()
                support = _exact.support_of([model.getSolVal(best, var) for var in z], keep)
                setup.incumbent.offer(support, problem.loss(support))
            raw, nodes = model.getStatus(), int(model.getNNodes())
            dual = model.getDualbound()
            bound = dual * c0 if math.isfinite(dual) and abs(dual) < model.infinity() else None
        status = "time_limit" if search.out_of_time else _STATUS.get(raw, f"scip_status_{raw}")
        if status == "optimal":
            loss = setup.incumbent.loss
            closed = bound is not None and loss - bound <= rel_gap * loss + VIOLATION * c0
            status = "optimal" if closed else "inaccurate"
        info = {"nodes": nodes, "cuts": len(setup.cuts) + search.counters["lazy_cuts"], "scip_status": raw,
                **search.counters}
        return status, bound, info
