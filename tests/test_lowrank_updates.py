"""Every low-rank formula of the search against a from-scratch solve on random SPD problems."""

from __future__ import annotations

import pytest
import torch

from osscar_opt.backends._lowrank import KeptSet
from tests.helpers import random_problem

SIZE_CASES = {
    "size1": [1] * 10,
    "size4": [4] * 8,
    "size32": [32] * 5,
    "mixed": [1, 4, 2, 32, 1, 3, 8, 1],
}


def scratch_loss(problem, support) -> float:
    return problem.loss(support)


def scratch_state(problem, support):
    """Hinv embedded at the kept columns and B = Hinv C (C = G here since m <= p)."""
    columns = problem.kept_columns(support)
    p = problem.num_columns
    Hinv = torch.zeros((p, p), dtype=torch.float64)
    Hinv[columns.unsqueeze(1), columns] = torch.linalg.inv(problem.H[columns][:, columns])
    B = Hinv @ problem.G
    return Hinv, B


@pytest.fixture(params=list(SIZE_CASES), ids=list(SIZE_CASES))
def sizes(request):
    return SIZE_CASES[request.param]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_removal_scores_match_scratch(sizes, seed):
    problem = random_problem(sizes, outputs=4, seed=seed)
    support = list(range(problem.num_groups))
    state = KeptSet(problem, support)
    scores = state.removal_scores()
    base = scratch_loss(problem, support)
    for g in support:
        expected = scratch_loss(problem, [h for h in support if h != g]) - base
        assert scores[g].item() == pytest.approx(expected, rel=1e-8, abs=1e-8 * abs(base))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_joint_removal_updates_inverse_weights_and_loss(sizes, seed):
    problem = random_problem(sizes, outputs=4, seed=seed)
    state = KeptSet(problem, range(problem.num_groups))
    removed = [0, problem.num_groups - 1]
    increase = state.remove_groups(removed)
    support = [g for g in range(problem.num_groups) if g not in removed]
    Hinv, B = scratch_state(problem, support)
    assert torch.allclose(state.Hinv, Hinv, rtol=1e-7, atol=1e-9 * Hinv.abs().max())
    assert torch.allclose(state.B, B, rtol=1e-7, atol=1e-9 * B.abs().max())
    expected_loss = scratch_loss(problem, support)
    assert state.loss == pytest.approx(expected_loss, rel=1e-8)
    assert increase == pytest.approx(expected_loss - scratch_loss(problem, range(problem.num_groups)), rel=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_add_gains_match_scratch(sizes, seed):
    problem = random_problem(sizes, outputs=4, seed=seed)
    support = list(range(0, problem.num_groups, 2))
    state = KeptSet(problem, support)
    gains = state.add_gains()
    base = scratch_loss(problem, support)
    for j in range(problem.num_groups):
        if j in support:
            assert gains[j].item() == float("-inf")
            continue
        expected = base - scratch_loss(problem, support + [j])
        assert gains[j].item() == pytest.approx(expected, rel=1e-7, abs=1e-9 * base)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_add_then_remove_tracks_outside_quantities(sizes, seed):
    problem = random_problem(sizes, outputs=4, seed=seed)
    support = list(range(0, problem.num_groups, 2))
    state = KeptSet(problem, support)
    state.track_outside()
    state.add_groups([1])
    state.remove_groups([0])
    state.add_groups([3] if problem.num_groups > 3 else [0])
    final = state.support()
    Hinv, B = scratch_state(problem, final)
    assert torch.allclose(state.Hinv, Hinv, rtol=1e-7, atol=1e-9 * Hinv.abs().max())
    assert torch.allclose(state.B, B, rtol=1e-7, atol=1e-9 * B.abs().max())
    assert state.loss == pytest.approx(scratch_loss(problem, final), rel=1e-8)
    # P and E of outside columns against their definitions.
    fresh = KeptSet(problem, final)
    fresh.track_outside()
    assert torch.allclose(state.P, fresh.P, rtol=1e-7, atol=1e-9 * fresh.P.abs().max())
    assert torch.allclose(state.E, fresh.E, rtol=1e-7, atol=1e-9 * fresh.E.abs().max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_swap_scores_every_pair(sizes, seed):
    problem = random_problem(sizes, outputs=4, seed=seed)
    support = list(range(1, problem.num_groups, 2))
    state = KeptSet(problem, support)
    state.track_outside()
    best_loss, drop, add = state.best_swap(torch.tensor(support))
    pairs = {
        (g, j): scratch_loss(problem, [h for h in support if h != g] + [j])
        for g in support
        for j in range(problem.num_groups)
        if j not in support
    }
    expected_pair = min(pairs, key=pairs.get)
    assert best_loss == pytest.approx(pairs[expected_pair], rel=1e-8)
    assert pairs[(drop, add)] == pytest.approx(pairs[expected_pair], rel=1e-8)


def test_refresh_equals_updated_state():
    problem = random_problem([2] * 12, outputs=5, seed=7)
    state = KeptSet(problem, range(12))
    state.remove_groups([4, 5, 6])
    state.track_outside()
    state.add_groups([5])
    before = (state.Hinv.clone(), state.B.clone(), state.P.clone(), state.E.clone(), state.loss)
    state.refresh()
    for updated, fresh in zip(before[:4], (state.Hinv, state.B, state.P, state.E), strict=True):
        assert torch.allclose(updated, fresh, rtol=1e-8, atol=1e-10 * fresh.abs().max())
    assert before[4] == pytest.approx(state.loss, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_move_score_equals_applied_move(sizes, seed):
    problem = random_problem(sizes, outputs=4, seed=seed)
    support = list(range(0, problem.num_groups, 2))
    state = KeptSet(problem, support)
    state.track_outside()
    drop = support[:2]
    predicted, add = state.score_batch_move(drop, 2)
    moved = [g for g in support if g not in drop] + add
    assert len(set(moved)) == len(support)
    assert predicted == pytest.approx(scratch_loss(problem, moved), rel=1e-8)
    # The added groups are the two best single adds against the reduced support.
    reduced = [g for g in support if g not in drop]
    base = scratch_loss(problem, reduced)
    single = {j: base - scratch_loss(problem, reduced + [j]) for j in range(problem.num_groups) if j not in reduced}
    assert sorted(add) == sorted(sorted(single, key=single.get, reverse=True)[:2])


@pytest.mark.parametrize("seed", [0, 1])
def test_maintained_schur_blocks_match_scratch(sizes, seed):
    problem = random_problem(sizes, outputs=4, seed=seed)
    state = KeptSet(problem, range(problem.num_groups))
    state.remove_groups([0, 1])
    state.track_outside()
    state.remove_groups([2])
    state.add_groups([0])
    fresh = KeptSet(problem, state.support())
    fresh.track_outside()
    for index in range(len(state.buckets)):
        outside = ~state.kept_group[state.buckets[index].group_ids]
        assert torch.allclose(state.S[index][outside], fresh.S[index][outside], rtol=1e-7, atol=1e-9)
