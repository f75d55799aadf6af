"""Solution quality of the heuristic backends against the enumerate oracle."""

from __future__ import annotations

import statistics

import pytest
import torch

from osscar_opt import solve
from osscar_opt.backends import _lowrank
from osscar_opt.backends._lowrank import KeptSet
from osscar_opt.backends._search import stage_sizes, staged_removal
from tests.helpers import random_problem

HEURISTICS = ("local-search", "greedy", "activation", "magnitude")


def instances(count: int, group_size: int, noise: float):
    for seed in range(count):
        yield seed, random_problem([group_size] * 12, outputs=6, seed=seed, rank=6, noise=noise)


@pytest.mark.slow
@pytest.mark.parametrize("group_size", [1, 3])
def test_local_search_reaches_the_enumerate_optimum(group_size):
    hits, total, worst = 0, 0, 0.0
    for _, problem in instances(10, group_size, noise=0.2):
        for keep in range(1, 12):
            optimum = solve(problem, keep, backend="enumerate").loss
            found = solve(problem, keep, backend="local-search").loss
            assert found >= optimum * (1 - 1e-9)
            total += 1
            hits += found <= optimum * (1 + 1e-9)
            worst = max(worst, found / optimum - 1)
    assert hits / total >= 0.95, f"optimum reached on {hits}/{total}"
    assert worst <= 0.005, f"worst relative excess {worst:.4%}"


def greedy_suboptimal_instances():
    """(problem, keep, optimum, greedy loss) where greedy elimination misses the optimum."""
    found = []
    for seed, problem in instances(40, 1, noise=0.02):
        for keep in (3, 4, 5, 6):
            optimum = solve(problem, keep, backend="enumerate").loss
            greedy = solve(problem, keep, backend="greedy").loss
            if greedy > optimum * (1 + 1e-6):
                found.append((seed, problem, keep, optimum, greedy))
    return found


@pytest.mark.slow
def test_local_search_is_strictly_better_where_greedy_is_suboptimal():
    cases = greedy_suboptimal_instances()
    assert len(cases) >= 10, "the generator must produce instances where greedy elimination is suboptimal"
    strictly_better = 0
    for seed, problem, keep, optimum, greedy in cases:
        local = solve(problem, keep, backend="local-search").loss
        assert local <= greedy * (1 + 1e-9), f"seed {seed} keep {keep}: local search worse than greedy"
        assert local >= optimum * (1 - 1e-9)
        strictly_better += local < greedy * (1 - 1e-9)
    assert strictly_better >= 0.9 * len(cases), f"strictly better on {strictly_better}/{len(cases)}"


def test_mean_loss_ordering():
    losses = {name: [] for name in HEURISTICS}
    for _, problem in instances(8, 2, noise=0.1):
        for keep in (3, 6, 9):
            optimum = solve(problem, keep, backend="enumerate").loss
            for name in HEURISTICS:
                losses[name].append(solve(problem, keep, backend=name).loss / optimum)
    mean = {name: statistics.fmean(values) for name, values in losses.items()}
    assert mean["local-search"] <= mean["greedy"] <= min(mean["activation"], mean["magnitude"]), mean


def test_float32_agrees_with_float64():
    problem = random_problem([4] * 24, outputs=8, seed=3, rows=500, noise=0.3)
    double = solve(problem, 10, backend="local-search")
    single = solve(problem, 10, backend="local-search", dtype=torch.float32)
    assert single.loss == pytest.approx(double.loss, rel=1e-3)
    assert single.weights.dtype == torch.float64  # re-fit from scratch in float64


def test_cpu_result_is_deterministic_for_a_seed():
    problem = random_problem([1] * 60, outputs=8, seed=5, rows=400)
    first = solve(problem, 20, backend="local-search", seed=7, restarts=2)
    second = solve(problem, 20, backend="local-search", seed=7, restarts=2)
    assert first.support == second.support and first.loss == second.loss
    assert torch.equal(first.weights, second.weights)


def test_restart_patience_stops_restarts_that_no_longer_improve():
    problem = random_problem([2] * 16, outputs=6, seed=12)
    full = solve(problem, 8, backend="local-search", restarts=8)
    patient = solve(problem, 8, backend="local-search", restarts=8, restart_patience=1)
    assert full.info["restarts_run"] == 8
    assert 1 <= patient.info["restarts_run"] < 8
    assert patient.loss >= full.loss * (1 - 1e-12)  # the same seed: a prefix of the same restarts
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="restart_patience"):
            solve(problem, 8, backend="local-search", restart_patience=bad)


def test_staged_removal_path_covers_intermediate_budgets():
    problem = random_problem([1] * 30, outputs=5, seed=6)
    greedy = solve(problem, 10, backend="greedy")
    budgets = [point.keep for point in greedy.path]
    assert budgets == list(range(30, 9, -1))
    for point in greedy.path[::5]:
        assert point.loss == pytest.approx(problem.loss(point.support), rel=1e-8, abs=1e-10 * problem.c0)
    staged = solve(problem, 10, backend="local-search", stages=4, max_swaps=0)
    assert [point.keep for point in staged.path] == [30, 25, 20, 15, 10]


def test_dead_groups_are_removed_first():
    problem = random_problem([2] * 10, outputs=5, seed=8)
    X = torch.zeros(0)  # noqa: F841 - documentation: the dead columns get no activation at all
    dead = [1, 4]
    columns = torch.cat([problem.groups[g] for g in dead])
    xtx = problem.H - problem.lam * torch.eye(problem.num_columns, dtype=torch.float64)
    xtx[columns] = 0
    xtx[:, columns] = 0
    weight = problem.weight
    from osscar_opt import LayerProblem

    H = xtx + problem.lam * torch.eye(problem.num_columns, dtype=torch.float64)
    G = H @ weight.T
    c0 = float((weight @ xtx * weight).sum()) + problem.lam * float(weight.square().sum())
    dead_problem = LayerProblem.from_statistics(
        H, G, c0, problem.group_of_column, lam=problem.lam, xtx_diag=torch.diagonal(xtx), weight=weight
    )
    assert dead_problem.dead_groups() == dead
    for keep in (3, 8):
        solution = solve(dead_problem, keep, backend="local-search")
        assert not set(dead) & set(solution.support)
        assert solution.info["dead_groups"] == 2


def test_time_limit_returns_a_full_budget_support():
    problem = random_problem([1] * 200, outputs=8, seed=9, rows=600)
    solution = solve(problem, 50, backend="local-search", time_limit=1e-6)
    assert len(solution.support) == 50
    assert solution.status == "time_limit"


def test_warm_start_is_used_and_checked():
    problem = random_problem([1] * 20, outputs=5, seed=10)
    warm = solve(problem, 8, backend="magnitude").support
    solution = solve(problem, 8, backend="local-search", warm_start=warm)
    assert solution.loss <= problem.loss(warm) + 1e-9
    with pytest.raises(ValueError, match="warm_start"):
        solve(problem, 8, backend="local-search", warm_start=warm[:3])


def test_enumerate_refuses_large_problems():
    problem = random_problem([1] * 30, outputs=4, seed=11)
    with pytest.raises(ValueError, match="max_subsets"):
        solve(problem, 15, backend="enumerate")


def test_oversized_swap_size_is_clamped_to_the_sides():
    problem = random_problem([1] * 10, outputs=4, seed=12)
    solution = solve(problem, 8, backend="local-search", swap_size=50)
    assert len(solution.support) == 8
    assert solution.loss <= solve(problem, 8, backend="greedy").loss * (1 + 1e-9)


WIDE_CASES = {
    "300 single columns": ([1] * 300, 150),
    "300 single columns, keep 60": ([1] * 300, 60),
    "96 groups of 3": ([3] * 96, 40),
    "mixed sizes": ([1, 2, 4] * 50, 70),
}


@pytest.mark.parametrize("case", list(WIDE_CASES), ids=list(WIDE_CASES))
def test_local_search_is_never_worse_than_greedy_on_wider_layers(case):
    """Problems above the small-problem size (no restarts) where swap batches of size > 1 run."""
    sizes, keep = WIDE_CASES[case]
    for seed in (0, 1):
        problem = random_problem(sizes, outputs=16, seed=seed, rows=500, rank=40, noise=0.2)
        local = solve(problem, keep, backend="local-search")
        greedy = solve(problem, keep, backend="greedy")
        assert local.loss <= greedy.loss * (1 + 1e-9), f"seed {seed}: {local.loss} > greedy {greedy.loss}"


@pytest.mark.parametrize("case", list(WIDE_CASES), ids=list(WIDE_CASES))
def test_blocked_inverse_path_gives_the_same_support_and_loss(case, monkeypatch):
    """The GEMM-blocked SPD inverse (used from BLOCKED_INVERSE_MIN columns on, forced here) leads
    local search and greedy to the same supports as cholesky_inverse."""
    sizes, keep = WIDE_CASES[case]
    problem = random_problem(sizes, outputs=16, seed=3, rows=500, rank=40, noise=0.2)
    results = []
    for minimum in (10**9, 16):
        monkeypatch.setattr(_lowrank, "BLOCKED_INVERSE_MIN", minimum)
        monkeypatch.setattr(_lowrank, "_BLOCKED_INVERSE_LEAF", 16)
        results.append([solve(problem, keep, backend=name) for name in ("local-search", "greedy")])
    for reference, blocked in zip(*results, strict=True):
        assert blocked.support == reference.support
        assert blocked.loss == pytest.approx(reference.loss, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_staged_removal_takes_the_from_scratch_smallest_scores(seed):
    """Each stage removes the groups whose single removal costs least, scored from scratch by
    re-fitting (the low-rank scores and blocked downdates must make the same decisions)."""
    problem = random_problem([1, 2] * 15, outputs=6, seed=seed, rows=300, rank=8, noise=0.2)
    keep, stages = 9, 4
    state = KeptSet(problem, range(problem.num_groups))
    dead = torch.zeros(problem.num_groups, dtype=torch.bool)
    path = staged_removal(state, keep, stages, dead, None)
    support = list(range(problem.num_groups))
    for count, point in zip(stage_sizes(problem.num_groups - keep, stages), path[1:], strict=True):
        base = problem.loss(support)
        scores = {g: problem.loss([h for h in support if h != g]) - base for g in support}
        removed = sorted(scores, key=scores.get)[:count]
        support = [g for g in support if g not in removed]
        assert list(point.support) == support
        assert point.loss == pytest.approx(problem.loss(support), rel=1e-9)
