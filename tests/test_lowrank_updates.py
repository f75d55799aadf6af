"""Every low-rank formula of the search against a from-scratch solve on random SPD problems."""

from __future__ import annotations

import pytest
import torch

from osscar_opt import LayerProblem
from osscar_opt.backends import _lowrank
from osscar_opt.backends._lowrank import KeptSet, _spd_inverse, quadratic_gains, spd_inverse
from tests.helpers import correlated_inputs, random_problem

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


def random_spd(n: int, seed: int, condition: float = 1e5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    spectrum = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), n, dtype=torch.float64)
    matrix = (basis * spectrum) @ basis.T
    return 0.5 * (matrix + matrix.T)


@pytest.mark.parametrize("n", [_lowrank.BLOCKED_INVERSE_MIN, 1100, 1537])
def test_blocked_spd_inverse_matches_cholesky_inverse(n):
    matrix = random_spd(n, seed=n)
    expected = torch.cholesky_inverse(torch.linalg.cholesky(matrix))
    inverse = spd_inverse(matrix)
    scale = expected.abs().max()
    assert torch.allclose(inverse, expected, rtol=1e-8, atol=1e-10 * scale)
    assert torch.allclose(inverse, inverse.T, rtol=0, atol=1e-12 * scale)
    identity = torch.eye(n, dtype=torch.float64)
    assert (matrix @ inverse - identity).abs().max() < 1e-7


@pytest.mark.parametrize("n", [8, 9, 13, 31, 64, 97])
def test_blocked_spd_inverse_recursion_on_uneven_splits(n, monkeypatch):
    monkeypatch.setattr(_lowrank, "BLOCKED_INVERSE_MIN", 8)
    monkeypatch.setattr(_lowrank, "_BLOCKED_INVERSE_LEAF", 3)
    matrix = random_spd(n, seed=n, condition=1e3)
    expected = torch.linalg.inv(matrix)
    assert torch.allclose(spd_inverse(matrix), expected, rtol=1e-9, atol=1e-11 * expected.abs().max())


def test_blocked_spd_inverse_falls_back_where_cholesky_fails(monkeypatch):
    monkeypatch.setattr(_lowrank, "BLOCKED_INVERSE_MIN", 8)
    generator = torch.Generator().manual_seed(4)
    factor = torch.randn(16, 6, generator=generator, dtype=torch.float64)
    singular = factor @ factor.T  # rank 6 of 16: Cholesky fails, the pseudo-inverse fallback runs
    assert int(torch.linalg.cholesky_ex(singular).info) != 0
    assert torch.equal(spd_inverse(singular), _spd_inverse(singular))


def test_single_column_gains_equal_the_block_formula():
    generator = torch.Generator().manual_seed(5)
    E_rows = torch.randn(7, 1, 3, generator=generator, dtype=torch.float64)
    S = torch.rand(7, 1, 1, generator=generator, dtype=torch.float64) + 0.1
    reference = (E_rows * (_spd_inverse(S) @ E_rows)).sum((1, 2))
    assert torch.allclose(quadratic_gains(E_rows, S), reference, rtol=1e-14, atol=0)
    # A round-off negative pivot gets the same floor as the pseudo-inverse fallback of _spd_inverse.
    S[2] = -1e-18
    reference = (E_rows * (_spd_inverse(S) @ E_rows)).sum((1, 2))
    assert torch.allclose(quadratic_gains(E_rows, S), reference, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_blocked_inverse_state_equals_the_cholesky_inverse_state(sizes, seed, monkeypatch):
    """Every buffer of a KeptSet built with the blocked inverse (forced on these small problems)
    equals the one built with cholesky_inverse, for the full support and after updates."""
    problem = random_problem(sizes, outputs=4, seed=seed)
    count = problem.num_groups
    states = []
    for minimum in (10**9, 2):
        monkeypatch.setattr(_lowrank, "BLOCKED_INVERSE_MIN", minimum)
        monkeypatch.setattr(_lowrank, "_BLOCKED_INVERSE_LEAF", 2)
        state = KeptSet(problem, range(count))
        first = (state.Hinv.clone(), state.B.clone(), state.loss)
        state.remove_groups([0, count - 1])
        state.track_outside()
        state.add_groups([0])
        state.refresh()  # a subset: the gathered H_RR goes through spd_inverse too
        states.append((first, state))
    (first_ref, ref), (first_new, new) = states
    for expected, got in zip(first_ref[:2], first_new[:2], strict=True):
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-11 * expected.abs().max())
    assert first_new[2] == pytest.approx(first_ref[2], rel=1e-11, abs=1e-12 * problem.c0)  # ~0: all kept
    for name in ("Hinv", "B", "P", "E"):
        expected, got = getattr(ref, name), getattr(new, name)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-11 * expected.abs().max()), name
    for expected, got in zip(ref.S, new.S, strict=True):
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-11 * max(1.0, float(expected.abs().max())))
    assert new.loss == pytest.approx(ref.loss, rel=1e-11, abs=1e-12 * problem.c0)


def test_always_kept_columns_stay_kept_and_enter_every_score():
    """Columns outside every group (always kept) are in the vectorized kept mask and in the scores."""
    X = correlated_inputs(200, 12, rank=4, noise=0.3, seed=3)
    W = torch.randn(5, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    problem = LayerProblem.from_activations(X, W, [[0, 1], [3], [4, 5, 6], [8, 9, 10, 11]], damp=1e-2)
    state = KeptSet(problem, [1, 3])
    assert torch.nonzero(state.kept_columns_mask()).flatten().tolist() == [2, 3, 7, 8, 9, 10, 11]
    assert state.loss == pytest.approx(problem.loss([1, 3]), rel=1e-10)
    scores = state.removal_scores()
    for g in (1, 3):
        expected = problem.loss([h for h in (1, 3) if h != g]) - problem.loss([1, 3])
        assert scores[g].item() == pytest.approx(expected, rel=1e-8)
    gains = state.add_gains()
    for g in (0, 2):
        assert gains[g].item() == pytest.approx(problem.loss([1, 3]) - problem.loss(sorted([1, 3, g])), rel=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repeated_refresh_reuses_buffers_without_stale_values(sizes, seed):
    """refresh() zeroes and re-uses its p x p buffers; nothing of the previous support may survive."""
    problem = random_problem(sizes, outputs=4, seed=seed)
    count = problem.num_groups
    state = KeptSet(problem, range(0, count, 2))
    state.track_outside()
    buffers = (state.Hinv, state.P)
    state.kept_group.zero_()
    state.kept_group[list(range(1, count, 2))] = True
    state.refresh()
    assert state.Hinv is buffers[0] and state.P is buffers[1]
    fresh = KeptSet(problem, range(1, count, 2))
    fresh.track_outside()
    for name in ("Hinv", "B", "P", "E"):
        expected, got = getattr(fresh, name), getattr(state, name)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12 * max(1.0, float(expected.abs().max()))), name
