"""Exact backends (gurobi, cvxpy; outer approximation and perspective MIQP) against the enumerate oracle."""

from __future__ import annotations

import importlib.util
import warnings

import pytest

from osscar_opt import solve
from tests.helpers import random_problem

HAS_GUROBI = importlib.util.find_spec("gurobipy") is not None
HAS_SCIP = importlib.util.find_spec("pyscipopt") is not None and importlib.util.find_spec("cvxpy") is not None
needs_gurobi = pytest.mark.skipif(not HAS_GUROBI, reason="gurobipy is not installed")
needs_scip = pytest.mark.skipif(not HAS_SCIP, reason="cvxpy with SCIP (pyscipopt) is not installed")
needs_pyscipopt = pytest.mark.skipif(importlib.util.find_spec("pyscipopt") is None, reason="pyscipopt is not installed")

# (group size, groups, outputs): size-8 problems stay under the 200-variable quadratic limit of
# the pip Gurobi licence in the MIQP form (5 * 8 * 3 + 2 * 5 = 130 variables).
SHAPES = [(1, 10, 4), (8, 5, 3)]
COMBOS = [
    pytest.param("gurobi", "outer-approximation", marks=needs_gurobi, id="gurobi-oa"),
    pytest.param("gurobi", "miqp", marks=needs_gurobi, id="gurobi-miqp"),
    pytest.param("cvxpy", "outer-approximation", marks=needs_scip, id="cvxpy-oa"),
    pytest.param("cvxpy", "miqp", marks=needs_scip, id="cvxpy-miqp"),
    pytest.param("scip", "outer-approximation", marks=needs_pyscipopt, id="scip-oa"),
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _problem(size: int, groups: int, outputs: int, seed: int):
    return random_problem([size] * groups, outputs=outputs, seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize("backend,formulation", COMBOS)
@pytest.mark.parametrize("size,groups,outputs", SHAPES)
def test_exact_backends_reach_the_enumerate_optimum(backend, formulation, size, groups, outputs):
    problem = _problem(size, groups, outputs, seed=11 + size)
    keeps = (3, 6) if size == 1 else (2,) if (backend, formulation) == ("cvxpy", "miqp") else (2, 3)
    for index, keep in enumerate(keeps):
        optimum = solve(problem, keep, backend="enumerate")
        warm = {} if index == 0 else {"warm_start": False}
        solution = solve(problem, keep, backend=backend, formulation=formulation, **warm)
        assert solution.status == "optimal", solution.info
        assert solution.loss == pytest.approx(optimum.loss, rel=1e-9)
        assert solution.lower_bound <= optimum.loss
        assert solution.gap is not None and solution.gap < 5e-3
        assert len(solution.support) == keep


@needs_gurobi
@pytest.mark.parametrize("formulation", ["outer-approximation", "miqp"])
def test_gurobi_time_limit_returns_incumbent_and_valid_bound(formulation):
    problem = _problem(1, 12, 6, seed=3)
    optimum = solve(problem, 5, backend="enumerate").loss
    for time_limit in (1e-3, 0.2):
        solution = solve(problem, 5, backend="gurobi", formulation=formulation, time_limit=time_limit)
        assert solution.status in ("time_limit", "optimal")
        assert len(solution.support) == 5
        assert solution.lower_bound is not None and solution.lower_bound <= optimum
        assert solution.loss >= optimum - 1e-9 * optimum


@needs_scip
@pytest.mark.parametrize("formulation", ["outer-approximation", "miqp"])
def test_cvxpy_time_limit_returns_incumbent_and_valid_bound(formulation):
    problem = _problem(8, 6, 3, seed=4)
    optimum = solve(problem, 3, backend="enumerate").loss
    solution = solve(problem, 3, backend="cvxpy", formulation=formulation, time_limit=0.3, warm_start=False)
    assert solution.status in ("time_limit", "optimal", "iteration_limit")
    assert solution.lower_bound is not None and solution.lower_bound <= optimum
    assert solution.gap is not None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounds_never_exceed_the_optimum_on_random_problems(seed):
    problem = _problem(1 if seed % 2 else 8, 8 if seed % 2 else 5, 3, seed=100 + seed)
    keep = 2 + seed % 2
    optimum = solve(problem, keep, backend="enumerate").loss
    combos = []
    if HAS_GUROBI:
        combos += [("gurobi", "outer-approximation"), ("gurobi", "miqp")]
    if HAS_SCIP:
        combos += [("cvxpy", "outer-approximation")]
    if not combos:
        pytest.skip("neither gurobipy nor cvxpy with SCIP is installed")
    for backend, formulation in combos:
        solution = solve(problem, keep, backend=backend, formulation=formulation, time_limit=0.05)
        assert solution.lower_bound <= optimum, (backend, formulation)
    backend, formulation = combos[seed % len(combos)]
    solution = solve(problem, keep, backend=backend, formulation=formulation, shift="block")
    assert solution.status == "optimal" and solution.lower_bound <= optimum


def test_unknown_options_and_bad_solver_are_rejected():
    problem = _problem(1, 6, 3, seed=5)
    with pytest.raises(ValueError, match="does not accept"):
        solve(problem, 3, backend="gurobi", bogus=1)
    with pytest.raises(ValueError, match="formulation"):
        solve(problem, 3, backend="gurobi", formulation="big-m-please")
    if HAS_SCIP:
        with pytest.raises(ValueError, match="installed"):
            solve(problem, 3, backend="cvxpy", solver="NOT_A_SOLVER")
        with pytest.raises(ValueError, match="cannot solve"):
            solve(problem, 3, backend="cvxpy", formulation="miqp", solver="HIGHS")
