"""The ``bnb`` backend (best-first branch and bound), partial-assignment bounds and sub-problems."""

from __future__ import annotations

import itertools

import pytest
import torch

from osscar_opt import solve
from osscar_opt.relaxation import PerspectiveFunction, block_shift, relax
from tests.helpers import random_problem


@pytest.fixture(scope="module")
def problems():
    return {"singles": random_problem([1] * 12, outputs=5, seed=30),
            "triples": random_problem([3] * 10, outputs=4, seed=31)}


@pytest.mark.parametrize("name", ["singles", "triples"])
@pytest.mark.parametrize("keep", [1, 4, 7])
def test_bnb_proves_the_enumerated_optimum(problems, name, keep):
    problem = problems[name]
    optimum = solve(problem, keep, "enumerate").loss
    solution = solve(problem, keep, "bnb", warm_start=False)
    assert solution.status == "optimal"
    assert solution.loss == pytest.approx(optimum, rel=1e-9)
    assert solution.lower_bound <= optimum * (1 + 1e-12)
    assert solution.gap <= 1e-6


def test_bnb_at_a_node_limit_returns_a_valid_bound_and_an_honest_status(problems):
    problem = problems["singles"]
    optimum = solve(problem, 6, "enumerate").loss
    solution = solve(problem, 6, "bnb", max_nodes=1, warm_start="greedy", shift="scalar")
    assert solution.status in ("node_limit", "optimal")
    assert solution.lower_bound <= optimum * (1 + 1e-12)
    if solution.status == "node_limit":
        assert solution.gap > 1e-6


def test_bnb_time_limit_stops_with_a_valid_bound():
    problem = random_problem([1] * 40, outputs=8, seed=33, rank=12)
    local = solve(problem, 20, "local-search")
    solution = solve(problem, 20, "bnb", time_limit=1.0, shift_iterations=2)
    assert solution.seconds < 15
    assert solution.status in ("time_limit", "optimal")
    assert solution.lower_bound <= solution.loss <= local.loss * (1 + 1e-12)


def test_bnb_rejects_bad_options(problems):
    problem = problems["singles"]
    for options, name in [({"shift": "eigen"}, "shift"), ({"node_iterations": 0}, "node_iterations"),
                          ({"max_nodes": 1.5}, "max_nodes"), ({"formulation": "miqp"}, "formulation"),
                          ({"time_limit": -1}, "time_limit"), ({"depth": 3}, "options")]:
        with pytest.raises(ValueError, match=name):
            solve(problem, 3, "bnb", **options)


@pytest.mark.parametrize("name", ["singles", "triples"])
def test_partial_assignment_bound_is_below_every_consistent_support(problems, name):
    problem = problems[name]
    keep = 5
    fn = PerspectiveFunction(problem, block_shift(problem, keep, pattern="diagonal", iterations=10)[0])
    generator = torch.Generator().manual_seed(5)
    for _ in range(4):
        order = torch.randperm(problem.num_groups, generator=generator).tolist()
        fixed_in, fixed_out = order[:2], order[2:5]
        restricted, free = fn.restrict(fixed_in, fixed_out)
        bound = relax(restricted, keep - len(fixed_in), iterations=80).bound
        best = min(problem.loss(fixed_in + list(extra)) for extra in itertools.combinations(free, keep - 2))
        assert bound <= best * (1 + 1e-12)
        # the restricted function is the perspective function of the partial assignment
        z = torch.zeros(problem.num_groups, dtype=torch.float64)
        z[fixed_in] = 1.0
        z[free[:3]] = 1.0
        assert restricted.value(z[free]) == pytest.approx(fn.value(z), rel=1e-9)
    with pytest.raises(ValueError, match="both"):
        fn.restrict([1], [1])


def test_subproblem_reconstructs_its_groups_own_contribution(problems):
    problem = problems["triples"]
    sub = problem.subproblem([7, 2, 5, 0])
    assert sub.num_groups == 4 and sub.group_sizes == [3] * 4
    assert sub.loss(range(4)) == pytest.approx(0.0, abs=1e-9 * sub.c0)
    assert sub.loss([]) == pytest.approx(sub.c0)
    columns = torch.cat([problem.groups[g] for g in (7, 2, 5, 0)])
    torch.testing.assert_close(sub.H, problem.H[columns][:, columns])
    for bad in ([], [1, 1], [99], "12"):
        with pytest.raises(ValueError, match="groups"):
            problem.subproblem(bad)


def test_capped_simplex_projection_satisfies_its_optimality_conditions():
    from osscar_opt.relaxation import project_capped_simplex

    generator = torch.Generator().manual_seed(3)
    for trial in range(300):
        size = int(torch.randint(1, 30, (1,), generator=generator))
        keep = int(torch.randint(0, size + 1, (1,), generator=generator))
        y = 2.0 * torch.randn(size, generator=generator, dtype=torch.float64)
        if trial % 5 == 0:
            y = torch.round(y)  # ties at the breakpoints
        z = project_capped_simplex(y, keep)
        assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0 and float(z.sum()) <= keep + 1e-9
        # z = clamp(y - tau, 0, 1) with tau >= 0, and tau > 0 only when the budget is tight
        free = (z > 1e-12) & (z < 1 - 1e-12)
        tau = (y - z)[free]
        if tau.numel():
            assert float(tau.max() - tau.min()) <= 1e-9
            assert float(tau[0]) >= -1e-9
            if float(tau[0]) > 1e-9:
                assert float(z.sum()) == pytest.approx(keep, abs=1e-9)


def test_certify_command_runs_bnb_and_reports_the_optimum(tmp_path, problems):
    import json

    from osscar_opt.cli import main

    path = tmp_path / "layer.safetensors"
    problems["singles"].save(path)
    out = tmp_path / "rows.json"
    assert main(["certify", str(path), "--keep", "5", "--backend", "bnb", "--time-limit", "30",
                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    exact = row["exact"]["bnb:branch-and-bound"]
    optimum = solve(problems["singles"], 5, "enumerate").loss
    assert exact["status"] == "optimal" and exact["loss"] == pytest.approx(optimum, rel=1e-9)
    assert row["bound"] <= optimum * (1 + 1e-12)


def test_bnb_with_a_shift_reoptimized_at_every_node_still_proves_the_optimum(problems):
    problem = problems["singles"]
    optimum = solve(problem, 6, "enumerate").loss
    solution = solve(problem, 6, "bnb", node_shift_steps=3, warm_start=False)
    assert solution.status == "optimal" and solution.loss == pytest.approx(optimum, rel=1e-9)
    assert solution.info["shifts_reoptimized"] >= 1
    with pytest.raises(ValueError, match="node_shift_steps"):
        solve(problems["triples"], 3, "bnb", shift="block", node_shift_steps=2)
