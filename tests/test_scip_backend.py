"""The ``scip`` backend (one branch-and-cut tree on pyscipopt) against the enumerate oracle. Real SCIP."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from osscar_opt import LayerProblem, backends, solve
from osscar_opt.relaxation import PerspectiveFunction
from tests.helpers import correlated_inputs, random_problem

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pyscipopt") is None, reason="pyscipopt is not installed")

# (group sizes, outputs, seed, keeps)
CASES = [
    ([1] * 10, 4, 11, (2, 3, 6)),
    ([8] * 5, 3, 19, (2, 3)),
    ([2, 3, 1, 4, 2, 3, 1, 2, 2], 6, 7, (4, 5)),
    ([4] * 12, 3, 0, (3, 6, 9)),
]


def _check_optimal(problem, keep, solution):
    optimum = solve(problem, keep, backend="enumerate").loss
    assert solution.status == "optimal", solution.info
    assert solution.loss == pytest.approx(optimum, rel=1e-9)
    assert solution.lower_bound is not None and solution.lower_bound <= optimum
    assert solution.gap is not None and solution.gap <= 1e-6
    assert len(solution.support) == keep


@pytest.mark.parametrize("sizes,outputs,seed,keeps", CASES)
def test_scip_proves_the_enumerate_optimum_with_and_without_warm_start(sizes, outputs, seed, keeps):
    problem = random_problem(sizes, outputs=outputs, seed=seed)
    for keep in keeps:
        for warm in (True, False, "greedy"):
            solution = solve(problem, keep, backend="scip", warm_start=warm)
            _check_optimal(problem, keep, solution)
            assert solution.info["formulation"] == "outer-approximation"
            assert solution.info["evaluations"] >= 0 and solution.info["nodes"] >= 0


@pytest.mark.parametrize("options", [{"upper_cuts": False}, {"fractional_cuts": True}, {"shift": "block"},
                                     {"rel_gap": 1e-9}, {"params": {"branching/mostinf/priority": 1_000_000}}])
def test_scip_cut_and_setting_variants_reach_the_optimum(options):
    problem = random_problem([2] * 11, outputs=5, seed=23)
    for keep in (3, 7):
        _check_optimal(problem, keep, solve(problem, keep, backend="scip", warm_start=False, **options))


def test_scip_with_always_kept_columns():
    X = correlated_inputs(200, 14, rank=4, noise=0.3, seed=3)
    W = torch.randn(5, 14, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    groups = [[0, 1], [2, 3], [5], [6, 7, 8], [9], [11, 12], [13]]  # columns 4 and 10 always kept
    problem = LayerProblem.from_activations(X, W, groups, damp=1e-2)
    for keep in (2, 4):
        _check_optimal(problem, keep, solve(problem, keep, backend="scip", warm_start=False))


def test_binary_cuts_on_kept_columns_match_the_perspective_function():
    from osscar_opt.backends.scip import binary_cut

    X = correlated_inputs(150, 12, rank=4, noise=0.3, seed=8)
    W = torch.randn(4, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    problem = LayerProblem.from_activations(X, W, [[0, 1], [2], [4, 5, 6], [7], [8, 9], [11]], damp=1e-2)
    fn = PerspectiveFunction(problem)
    for support in [(), (1,), (0, 2), (0, 1, 3, 5), (0, 1, 2, 3, 4, 5)]:
        cut = binary_cut(fn, support)
        z = torch.zeros(problem.num_groups, dtype=torch.float64)
        z[list(support)] = 1.0
        value, grad = fn.value_and_grad(z)
        assert cut.value == pytest.approx(value, rel=1e-10, abs=1e-10 * problem.c0)
        torch.testing.assert_close(cut.grad, grad, rtol=1e-8, atol=1e-10 * problem.c0)
        assert torch.equal(cut.z, z)
        if support:  # f at a support is its loss
            assert cut.value == pytest.approx(problem.loss(support), rel=1e-9)


def test_scip_time_limits_keep_a_valid_bound_and_a_full_support():
    problem = random_problem([3] * 30, outputs=16, seed=5, rank=10, noise=0.5)
    keep = 9
    heuristic = solve(problem, keep, "local-search")
    for limit, warm in ((1e-3, True), (0.3, False), (0.3, True)):
        begin = time.perf_counter()
        solution = solve(problem, keep, backend="scip", time_limit=limit, warm_start=warm)
        assert time.perf_counter() - begin <= limit + 3.0
        assert solution.status in ("time_limit", "optimal")
        assert len(solution.support) == keep
        assert solution.lower_bound is not None and 0 <= solution.lower_bound <= solution.loss
        assert solution.lower_bound <= heuristic.loss * (1 + 1e-9)  # never above a feasible loss


def test_scip_bound_never_exceeds_the_optimum_when_stopped_early():
    problem = random_problem([1] * 14, outputs=6, seed=3)
    optimum = solve(problem, 6, backend="enumerate").loss
    for options in ({"time_limit": 0.05}, {"params": {"limits/nodes": 2}}, {"params": {"limits/nodes": 8}}):
        solution = solve(problem, 6, backend="scip", warm_start=False, **options)
        assert solution.lower_bound <= optimum * (1 + 1e-12)
        assert solution.loss >= optimum * (1 - 1e-12)
        if solution.status != "optimal":
            assert solution.status in ("time_limit", "node_limit")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bogus": 1}, r"options: backend 'scip' does not accept \['bogus'\]"),
        ({"solver": "SCIP"}, r"does not accept \['solver'\]"),
        ({"formulation": "miqp"}, "formulation: the 'scip' backend solves only 'outer-approximation'"),
        ({"formulation": "big-m-please"}, "formulation: expected one of"),
        ({"time_limit": -1}, "time_limit"),
        ({"rel_gap": 2}, "rel_gap"),
        ({"fractional_cuts": "yes"}, "fractional_cuts"),
        ({"upper_cuts": 1}, "upper_cuts"),
        ({"params": ["limits/nodes"]}, "params: expected a dict"),
        ({"params": {"no/such/parameter": 1}}, "params: SCIP refuses no/such/parameter"),
    ],
)
def test_scip_refuses_bad_options_naming_them(options, message):
    problem = random_problem([1] * 6, outputs=3, seed=5)
    with pytest.raises(ValueError, match=message):
        solve(problem, 3, backend="scip", **options)


def test_scip_is_a_registered_exact_backend():
    cls = backends.get("scip")
    assert "scip" in backends.available()
    assert cls.exact and cls.requires == ("pyscipopt",) and cls.extra == "exact"
    assert {"time_limit", "rel_gap", "warm_start", "params"} <= set(cls.options)


def test_an_error_inside_a_scip_callback_is_raised_not_swallowed(monkeypatch):
    from osscar_opt.backends import scip

    def broken(fn, support):
        raise RuntimeError("cut failed")

    monkeypatch.setattr(scip, "binary_cut", broken)
    problem = random_problem([1] * 8, outputs=4, seed=2)
    with pytest.raises(RuntimeError, match="cut failed"):
        solve(problem, 4, backend="scip", warm_start=False)
