"""LayerProblem: statistics, loss, weights, bias re-fit, streaming, save/load and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from osscar_opt import LayerProblem, StatsAccumulator, solve
from tests.helpers import correlated_inputs, random_problem


def direct_loss(X, Y, W, W_hat, lam, b_hat=None, b=None) -> float:
    """||Y - X What^T - b_hat||^2 + lam ||[W b] - [What b_hat]||^2, straight from the definition."""
    prediction = X @ W_hat.T + (0 if b_hat is None else b_hat)
    ridge = (W - W_hat).square().sum()
    if b_hat is not None:
        ridge = ridge + ((0 if b is None else b) - b_hat).square().sum()
    return float((Y - prediction).square().sum() + lam * ridge)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_equals_direct_residual_with_given_targets(seed):
    X = correlated_inputs(120, 12, rank=3, noise=0.2, seed=seed)
    W = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    Y = X @ W.T + 0.1 * torch.randn(120, 5, dtype=torch.float64)
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    problem = LayerProblem.from_activations(X, W, groups, Y=Y, damp=0.05)
    for support in [(0,), (1, 3), (0, 2, 3), (0, 1, 2, 3), ()]:
        W_hat = problem.weights(support)
        assert problem.loss(support) == pytest.approx(direct_loss(X, Y, W, W_hat, problem.lam), rel=1e-9)
        pruned = [c for g in set(range(4)) - set(support) for c in groups[g]]
        assert torch.all(W_hat[:, pruned] == 0)
    assert problem.loss(()) == pytest.approx(problem.c0)


def test_weights_are_the_least_squares_optimum_on_their_support():
    X = correlated_inputs(80, 6, rank=2, noise=0.3, seed=4)
    W = torch.randn(3, 6, dtype=torch.float64)
    problem = LayerProblem.from_activations(X, W, [[0, 1], [2, 3], [4, 5]])
    support = (0, 2)
    W_hat = problem.weights(support)
    base = direct_loss(X, X @ W.T, W, W_hat, problem.lam)
    for _ in range(5):
        perturbed = W_hat.clone()
        perturbed[:, [0, 1, 4, 5]] += 1e-3 * torch.randn(3, 4, dtype=torch.float64)
        assert direct_loss(X, X @ W.T, W, perturbed, problem.lam) > base


def test_bias_refit_is_the_optimal_bias():
    X = correlated_inputs(150, 8, rank=3, noise=0.3, seed=5) + 2.0  # non-centred inputs
    W = torch.randn(4, 8, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    fixed = LayerProblem.from_activations(X, W, groups, bias=b)
    refit = LayerProblem.from_activations(X, W, groups, bias=b, refit_bias=True)
    assert refit.has_bias_column and refit.num_inputs == 8 and refit.num_columns == 9
    support = (1, 2)
    W_hat, b_hat = refit.weights(support), refit.bias(support)
    Y = X @ W.T + b
    assert refit.loss(support) == pytest.approx(direct_loss(X, Y, W, W_hat, refit.lam, b_hat, b), rel=1e-9)
    assert fixed.bias(support) is None
    # Re-fitting the bias can only help on the data term (the ridge anchors it at b).
    data_fixed = (Y - X @ fixed.weights(support).T - b).square().sum()
    data_refit = (Y - X @ W_hat.T - b_hat).square().sum()
    assert data_refit < data_fixed
    solution = solve(refit, 2, backend="greedy")
    assert solution.bias is not None and solution.bias.shape == (4,)


def test_streaming_accumulator_matches_one_shot_statistics():
    X = correlated_inputs(301, 10, rank=4, noise=0.5, seed=6)
    W = torch.randn(7, 10, dtype=torch.float64)
    Y = X @ W.T + torch.randn(301, 7, dtype=torch.float64)
    groups = [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9]]
    accumulator = StatsAccumulator(10, num_outputs=7)
    for start in range(0, 301, 37):
        batch = X[start : start + 37]
        accumulator.add(batch.view(1, -1, 10), Y[start : start + 37].view(1, -1, 7))
    streamed = accumulator.problem(W, groups, damp=0.01)
    direct = LayerProblem.from_activations(X, W, groups, Y=Y, damp=0.01)
    assert torch.allclose(streamed.H, direct.H, rtol=1e-12)
    assert torch.allclose(streamed.G, direct.G, rtol=1e-12)
    assert streamed.c0 == pytest.approx(direct.c0, rel=1e-12)


def test_float32_batches_accumulate_in_float64():
    torch.manual_seed(0)
    accumulator = StatsAccumulator(4)
    batches = [torch.randn(1000, 4) + 100 for _ in range(50)]
    for batch in batches:
        accumulator.add(batch)
    exact = sum(batch.double().T @ batch.double() for batch in batches)
    assert accumulator.xtx.dtype == torch.float64
    assert torch.allclose(accumulator.xtx, exact, rtol=1e-13)


def test_groups_accepts_label_vector_with_always_kept_columns():
    X = correlated_inputs(60, 6, rank=2, noise=0.3, seed=8)
    W = torch.randn(2, 6, dtype=torch.float64)
    by_list = LayerProblem.from_activations(X, W, [[0, 1], [3, 4]])
    by_labels = LayerProblem.from_activations(X, W, np.array([0, 0, -1, 1, 1, -1]))
    assert torch.equal(by_list.group_of_column, by_labels.group_of_column)
    assert by_labels.always_kept_columns.tolist() == [2, 5]
    assert by_labels.loss((0,)) == pytest.approx(by_list.loss((0,)))
    assert torch.all(by_labels.weights(())[:, [2, 5]] != 0)


def test_save_load_round_trip_is_exact(tmp_path):
    problem = random_problem([3, 1, 2, 4], outputs=5, seed=9)
    problem.meta["name"] = "encoder.layer.0.output.dense"
    path = tmp_path / "layer.safetensors"
    problem.save(path)
    loaded = LayerProblem.load(path)
    assert torch.equal(loaded.H, problem.H) and torch.equal(loaded.G, problem.G)
    assert loaded.c0 == problem.c0 and loaded.lam == problem.lam
    assert torch.equal(loaded.group_of_column, problem.group_of_column)
    assert torch.equal(loaded.weight, problem.weight) and torch.equal(loaded.xtx_diag, problem.xtx_diag)
    assert loaded.meta == problem.meta
    assert loaded.loss((0, 3)) == problem.loss((0, 3))


def test_saved_problem_budget_is_an_integer_field(tmp_path, capsys):
    from safetensors import safe_open

    from osscar_opt import cli

    problem = random_problem([2, 2, 2, 2, 2], outputs=3, seed=15)
    assert problem.keep is None
    problem.keep = 2
    problem.meta["name"] = "layer"
    path = tmp_path / "000.0_layer.safetensors"
    problem.save(path)
    with safe_open(str(path), framework="pt") as handle:  # a 0-d int64 tensor, not a string in the metadata
        stored = handle.get_tensor("keep")
        assert "keep" not in handle.metadata()["meta"]
    assert stored.dtype == torch.int64 and stored.dim() == 0 and int(stored) == 2
    loaded = LayerProblem.load(path)
    assert loaded.keep == 2 and type(loaded.keep) is int and "keep" not in loaded.meta
    assert loaded.to("cpu", torch.float32).keep == 2
    # ``osscar solve DIR`` without --keep / --sparsity solves at the saved budget
    assert cli.main(["solve", str(tmp_path), "--backend", "greedy", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["name"], row["keep"]) for row in rows] == [("layer", 2)]
    # a problem saved without a budget needs one on the command line
    problem.keep = None
    problem.save(path)
    assert LayerProblem.load(path).keep is None
    assert cli.main(["solve", str(tmp_path)]) == 2
    assert "keep: problem layer has no saved budget" in capsys.readouterr().err
    assert cli.main(["solve", str(tmp_path), "--keep", "3", "--json"]) == 0
    assert [row["keep"] for row in json.loads(capsys.readouterr().out)] == [3]


@pytest.mark.parametrize("keep", [-1, 6, 2.0, "2", True])
def test_a_budget_that_is_not_a_group_count_is_rejected(keep):
    problem = random_problem([2] * 5, seed=16)
    with pytest.raises(ValueError, match=r"keep: expected an integer in \[0, 5\]"):
        problem.keep = keep


def test_load_rejects_a_budget_that_is_not_an_integer_scalar(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "layer.safetensors"
    random_problem([2, 2], seed=17).save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    for bad in (torch.tensor(1.0), torch.tensor([1])):
        save_file({**tensors, "keep": bad}, str(path), metadata=metadata)
        with pytest.raises(ValueError, match="'keep' field"):
            LayerProblem.load(path)


def test_to_changes_device_and_dtype_only():
    problem = random_problem([2, 2, 2], seed=10)
    single = problem.to("cpu", torch.float32)
    assert single.H.dtype == torch.float32 and single.group_of_column.dtype == torch.int64
    assert single.num_groups == problem.num_groups


def test_keep_all_and_keep_zero():
    problem = random_problem([2] * 5, seed=11)
    every = solve(problem, 5)
    assert every.support == (0, 1, 2, 3, 4) and every.status == "optimal"
    none = solve(problem, 0)
    assert none.support == () and none.loss == pytest.approx(problem.c0)
    assert torch.all(none.weights == 0)


# ---------------------------------------------------------------------------------- bad input
def with_entry(tensor: torch.Tensor, value: float) -> torch.Tensor:
    changed = tensor.clone()
    changed[1, 1] = value
    return changed


def good_inputs():
    X = correlated_inputs(40, 4, rank=2, noise=0.3, seed=12)
    W = torch.randn(3, 4, dtype=torch.float64)
    return X, W, [[0, 1], [2, 3]]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda X, W, g: (with_entry(X, float("nan")), W, g), "X: contains 1 NaN"),
        (lambda X, W, g: (X, with_entry(W, float("inf")), g), "W: contains 1 NaN or Inf"),
        (lambda X, W, g: (X, W[:, :3], g), "X: has 4 columns"),
        (lambda X, W, g: (X, W, [[0, 1], [1, 2]]), "overlap"),
        (lambda X, W, g: (X, W, [[0, 1], []]), "empty"),
        (lambda X, W, g: (X, W, [[0, 1], [2, 7]]), "outside"),
        (lambda X, W, g: (X, W, [[0, 0], [2, 3]]), "twice"),
        (lambda X, W, g: (X, W, np.array([0, 0, 2, 2])), "contiguous"),
        (lambda X, W, g: (X, W, np.array([0, 0, 1])), "length"),
    ],
)
def test_bad_activation_input_names_the_argument(mutate, message):
    X, W, groups = mutate(*good_inputs())
    with pytest.raises(ValueError, match=message):
        LayerProblem.from_activations(X, W, groups)


def test_bad_damp_and_shape_of_targets():
    X, W, groups = good_inputs()
    with pytest.raises(ValueError, match="damp"):
        LayerProblem.from_activations(X, W, groups, damp=0)
    with pytest.raises(ValueError, match="Y"):
        LayerProblem.from_activations(X, W, groups, Y=torch.zeros(39, 3))


def test_bad_statistics_are_rejected():
    H = torch.eye(4, dtype=torch.float64) * 2
    G = torch.ones(4, 2, dtype=torch.float64)
    groups = [[0, 1], [2, 3]]
    asymmetric = H.clone()
    asymmetric[0, 1] = 1.0
    with pytest.raises(ValueError, match="H: not symmetric"):
        LayerProblem.from_statistics(asymmetric, G, 10.0, groups)
    indefinite = H.clone()
    indefinite[3, 3] = -1.0
    with pytest.raises(ValueError, match="H: not positive definite"):
        LayerProblem.from_statistics(indefinite, G, 10.0, groups)
    nan_G = G.clone()
    nan_G[0, 0] = float("nan")
    with pytest.raises(ValueError, match="G"):
        LayerProblem.from_statistics(H, nan_G, 10.0, groups)
    with pytest.raises(ValueError, match="G: expected shape"):
        LayerProblem.from_statistics(H, G[:3], 10.0, groups)
    with pytest.raises(ValueError, match="c0"):
        LayerProblem.from_statistics(H, G, float("nan"), groups)


@pytest.mark.parametrize("keep", [-1, 3, 1.5, "2", True])
def test_bad_keep_is_rejected(keep):
    problem = random_problem([2, 2], seed=13)
    with pytest.raises(ValueError, match="keep"):
        solve(problem, keep)


def test_unknown_backend_lists_available():
    problem = random_problem([2, 2], seed=13)
    with pytest.raises(ValueError, match="unknown backend 'nope'.*local-search"):
        solve(problem, 1, backend="nope")


def test_unknown_option_is_rejected():
    problem = random_problem([2, 2, 2], seed=13)
    with pytest.raises(ValueError, match="does not accept"):
        solve(problem, 1, backend="local-search", swaps=3)


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(ValueError, match="path"):
        LayerProblem.load(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(ValueError, match="not an osscar_opt LayerProblem"):
        LayerProblem.load(foreign)
    truncated = tmp_path / "truncated.safetensors"
    random_problem([2, 2], seed=14).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with pytest.raises(ValueError, match="path"):
        LayerProblem.load(truncated)
    with pytest.raises(ValueError, match="no such problem file"):
        LayerProblem.load(tmp_path / "missing.safetensors")
