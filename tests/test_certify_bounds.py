"""The perspective function, its gradient, shifts, relaxation bounds and ``certify``."""

from __future__ import annotations

import pytest
import torch

from osscar_opt import certify, solve
from osscar_opt.relaxation import (
    PerspectiveFunction,
    block_shift,
    generalized_block_shift,
    relax,
    scalar_shift,
    thin_factor,
)
from tests.helpers import random_problem


@pytest.fixture(scope="module")
def problems():
    return {1: random_problem([1] * 10, outputs=12, seed=21), 8: random_problem([8] * 6, outputs=5, seed=22)}


def test_thin_factor_reproduces_g_gt():
    G = torch.randn(5, 9, dtype=torch.float64)
    C = thin_factor(G)
    assert C.shape == (5, 5)
    torch.testing.assert_close(C @ C.T, G @ G.T)


@pytest.mark.parametrize("size", [1, 8])
@pytest.mark.parametrize("shift", ["scalar", "generalized"])
def test_perspective_gradient_matches_finite_differences(problems, size, shift):
    problem = problems[size]
    chosen = scalar_shift(problem) if shift == "scalar" else generalized_block_shift(problem)
    fn = PerspectiveFunction(problem, chosen)
    generator = torch.Generator().manual_seed(size)
    z = 0.1 + 0.8 * torch.rand(problem.num_groups, generator=generator, dtype=torch.float64)
    _, grad = fn.value_and_grad(z)
    step = 1e-6
    for g in range(problem.num_groups):
        e = torch.zeros_like(z)
        e[g] = step
        numeric = (fn.value(z + e) - fn.value(z - e)) / (2 * step)
        assert numeric == pytest.approx(float(grad[g]), rel=1e-5, abs=1e-7 * problem.c0)
    assert bool((grad <= 0).all())


@pytest.mark.parametrize("size", [1, 8])
def test_perspective_function_equals_loss_at_binary_points_and_is_convex(problems, size):
    problem = problems[size]
    for shift in (scalar_shift(problem), generalized_block_shift(problem)):
        fn = PerspectiveFunction(problem, shift)
        for support in ([], [0, 2], list(range(problem.num_groups))):
            z = torch.zeros(problem.num_groups, dtype=torch.float64)
            z[support] = 1.0
            assert fn.value(z) == pytest.approx(problem.loss(support), rel=1e-9, abs=1e-10 * problem.c0)
        a = torch.rand(problem.num_groups, dtype=torch.float64)
        b = torch.rand(problem.num_groups, dtype=torch.float64)
        assert fn.value(0.5 * (a + b)) <= 0.5 * (fn.value(a) + fn.value(b)) + 1e-9 * problem.c0


@pytest.mark.parametrize("method", ["projected-gradient", "frank-wolfe"])
@pytest.mark.parametrize("size", [1, 8])
def test_relaxation_bound_is_monotone_and_below_the_optimum(problems, size, method):
    problem = problems[size]
    keep = 3
    optimum = solve(problem, keep, backend="enumerate").loss
    result = relax(PerspectiveFunction(problem, "scalar"), keep, iterations=60, method=method, rel_tol=0.0)
    history = result.history
    assert all(later >= earlier for earlier, later in zip(history, history[1:], strict=False))
    assert history[-1] > history[0]
    assert result.bound <= optimum
    assert result.value >= result.bound  # f at a feasible point is above the relaxation optimum


@pytest.mark.parametrize("pattern", ["diagonal", "block"])
@pytest.mark.parametrize("size", [1, 8])
def test_optimized_shift_is_valid_and_never_weaker_than_scalar(problems, size, pattern):
    problem = problems[size]
    keep = 2 if size == 8 else 4
    optimum = solve(problem, keep, backend="enumerate").loss
    shift, info = block_shift(problem, keep, pattern=pattern, iterations=20)
    eigenvalues = torch.linalg.eigvalsh(problem.H - shift.D)
    assert float(eigenvalues[0]) >= -1e-10 * float(eigenvalues[-1])
    final = relax(PerspectiveFunction(problem, shift), keep, iterations=300).bound
    scalar = relax(PerspectiveFunction(problem, "scalar"), keep, iterations=300).bound
    assert scalar * (1 - 1e-6) <= final <= optimum
    assert info["scalar_bound"] <= info["block_bound"] <= optimum


def _sdp_bound(problem, keep):
    """The perspective relaxation's SDP bound with the best diagonal shift, by CLARABEL (its dual form:
    ``min tr(H P) - 2 tr(B^T C) + c0`` with ``[[P, B], [B^T, I]] >= 0``, ``P_ii z_i >= ||B_i||^2``)."""
    cp = pytest.importorskip("cvxpy")
    import numpy as np

    H, C = problem.H.numpy(), thin_factor(problem.G).numpy()
    p, r = C.shape
    P, B, z = cp.Variable((p, p), symmetric=True), cp.Variable((p, r)), cp.Variable(p)
    constraints = [cp.bmat([[P, B], [B.T, np.eye(r)]]) >> 0, z >= 0, z <= 1, cp.sum(z) <= keep]
    constraints += [cp.quad_over_lin(B[i], z[i]) <= P[i, i] for i in range(p)]
    objective = cp.Minimize(cp.trace(H @ P) - 2 * cp.sum(cp.multiply(B, C)) + problem.c0)
    return cp.Problem(objective, constraints).solve(solver="CLARABEL")


def test_diagonal_shift_reaches_the_sdp_bound_on_a_real_like_problem():
    problem = random_problem([1] * 16, outputs=6, seed=41, rank=4, noise=0.1)
    keep = 8
    sdp = _sdp_bound(problem, keep)
    shift, _ = block_shift(problem, keep, pattern="diagonal", iterations=40)
    bound = relax(PerspectiveFunction(problem, shift), keep, iterations=400).bound
    scalar = relax(PerspectiveFunction(problem, "scalar"), keep, iterations=400).bound
    optimum = solve(problem, keep, backend="enumerate").loss
    assert bound <= optimum
    assert bound <= sdp * (1 + 1e-4) + 1e-9 * problem.c0  # the SDP value is the best any diagonal shift gives
    assert bound >= sdp - 0.02 * (sdp - scalar)  # and the search closes at least 98% of the way to it


@pytest.mark.parametrize("size", [1, 8])
def test_certify_gives_a_valid_certified_gap(problems, size):
    problem = problems[size]
    keep = 4
    optimum = solve(problem, keep, backend="enumerate").loss
    heuristic = solve(problem, keep, backend="magnitude")
    certificate = certify(problem, heuristic, shift="both", iterations=80, shift_iterations=15)
    assert certificate.lower_bound <= optimum
    assert certificate.loss == pytest.approx(heuristic.loss)
    assert certificate.gap == pytest.approx((heuristic.loss - certificate.lower_bound) / heuristic.loss)
    assert certificate.bounds["block"] >= certificate.bounds["scalar"]
    assert certificate.tightening is not None and 0.0 <= certificate.tightening <= 1.0
    by_support = certify(problem, heuristic.support, iterations=20)
    assert by_support.keep == keep and by_support.lower_bound <= optimum


def test_certify_rejects_bad_input(problems):
    problem = problems[1]
    with pytest.raises(ValueError, match="shift"):
        certify(problem, [0, 1], shift="eigen")
    with pytest.raises(ValueError, match="keep"):
        certify(problem, [0, 1, 2], keep=2)
    with pytest.raises(ValueError, match="solution"):
        certify(problem, [0, 99])
    with pytest.raises(ValueError, match="method"):
        relax(PerspectiveFunction(problem), 2, method="newton")


def test_certify_command_writes_rows(tmp_path, problems, capsys):
    import importlib.util
    import json

    from osscar_opt.cli import main

    path = tmp_path / "layer.safetensors"
    problems[8].save(path)
    backends = ["--backend", "gurobi"] if importlib.util.find_spec("gurobipy") else ["--backend", "none"]
    out = tmp_path / "rows.json"
    code = main(["certify", str(path), "--keep", "2", "3", "--iterations", "30", "--time-limit", "20",
                 *backends, "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [row["keep"] for row in rows] == [2, 3]
    for row in rows:
        optimum = solve(problems[8], row["keep"], backend="enumerate").loss
        assert row["bound"] <= optimum <= row["heuristic_loss"] + 1e-9 * optimum
        assert 0.0 <= row["certified_gap"] <= 1.0
    assert "gap %" in capsys.readouterr().out
    assert main(["certify", str(tmp_path / "missing.safetensors"), "--keep", "2"]) == 2
