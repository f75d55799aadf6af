"""The calibration target (pruned-input / dense-output), held-out statistics and ``damp="auto"``."""

from __future__ import annotations

import pytest
import torch

from osscar_opt import solve
from osscar_opt.accumulator import DAMP_GRID, SplitAccumulator, StatsAccumulator, choose_damp
from osscar_opt.budget import keep_count
from osscar_opt.pipeline import prune
from osscar_opt.problem import LayerProblem
from tests.tiny_transformers import tiny_model, token_ids


class AllBut:
    """Budget: half of every structure's groups, except the structures named in ``skip`` (left alone)."""

    def __init__(self, skip: set[str]) -> None:
        self.skip = skip

    def keep(self, name: str, kind: str, num_groups: int) -> int | None:
        return None if name in self.skip else keep_count(num_groups, 0.5)

    def kinds(self) -> set[str]:
        return {"kv_groups", "neurons"}


@torch.no_grad()
def layer_io(model: torch.nn.Module, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input rows (n, p) and output rows (n, m) of module ``name`` on ``ids``, float64."""
    module = model.get_submodule(name)
    seen = {}
    handle = module.register_forward_hook(lambda _m, i, o: seen.update(x=i[0], y=o))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    handle.remove()
    return (seen["x"].reshape(-1, seen["x"].shape[-1]).double(), seen["y"].reshape(-1, seen["y"].shape[-1]).double())


def ridge_fit(X: torch.Tensor, Y: torch.Tensor, W: torch.Tensor, kept: torch.Tensor, damp: float) -> torch.Tensor:
    """argmin_B ||Y - X_S B^T||^2 + lam ||W_S - B||^2 with lam = damp * mean(diag(X^T X)), directly."""
    lam = damp * float(X.square().sum(0).mean())
    X_S = X[:, kept]
    lhs = X_S.T @ X_S + lam * torch.eye(len(kept), dtype=torch.float64)
    return torch.linalg.solve(lhs, X_S.T @ Y + lam * W[:, kept].T).T


@pytest.mark.parametrize("target", ["pruned-input", "dense-output"])
def test_each_target_is_the_direct_least_squares_fit_of_its_definition(target):
    ids = token_ids()
    pruned = tiny_model("llama")
    report = prune(pruned, ids, AllBut(set()), backend="greedy", target=target, damp=1e-2, progress=False)
    last = report.layers[-1]  # the last block's MLP, calibrated on a model pruned everywhere before it
    assert last.kind == "neurons" and last.stage == 1
    # The same run with that layer left alone: its input is the pruned model's, its weight the dense one.
    before_last = tiny_model("llama")
    prune(before_last, ids, AllBut({last.name}), backend="greedy", target=target, damp=1e-2, progress=False)
    X_pruned, _ = layer_io(before_last, last.name, ids)
    W = before_last.get_submodule(last.name).weight.double()
    if target == "pruned-input":
        Y = X_pruned @ W.T
    else:
        _, Y = layer_io(tiny_model("llama"), last.name, ids)
    expected = ridge_fit(X_pruned, Y, W, torch.tensor(last.kept), damp=1e-2)
    got = pruned.get_submodule(last.name).weight.double()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    # and the two targets really differ on this model
    other = "dense-output" if target == "pruned-input" else "pruned-input"
    check = tiny_model("llama")
    prune(check, ids, AllBut(set()), backend="greedy", target=other, damp=1e-2, progress=False)
    assert not torch.allclose(check.get_submodule(last.name).weight, pruned.get_submodule(last.name).weight)


def test_split_statistics_merge_to_the_one_shot_statistics():
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(10, 7, 5, generator=generator, dtype=torch.float64)  # (samples, positions, p)
    targets = torch.randn(10, 7, 3, generator=generator, dtype=torch.float64)
    rows = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    split = SplitAccumulator(5, 3, every=4)
    for start in (0, 3, 6):  # uneven batches: 3, 3, 4 samples
        batch = slice(start, start + 3 if start < 6 else 10)
        split.add(samples[batch], targets[batch], input_rows=rows, output_rows=rows)
    one_shot = StatsAccumulator(5, 3)
    one_shot.add(rows(samples), rows(targets))
    merged = split.merged()
    for name in ("xtx", "x_sum", "xty", "y_sum"):
        assert torch.allclose(getattr(merged, name), getattr(one_shot, name), rtol=1e-12, atol=1e-12), name
    assert merged.rows == one_shot.rows == 70 and merged.y_square == pytest.approx(one_shot.y_square, rel=1e-12)
    held = samples[[3, 7]]  # every 4th sample, counted over all batches
    assert split.heldout.rows == 14
    assert torch.allclose(split.heldout.xtx, rows(held).T @ rows(held), rtol=1e-12)


def constructed_layer(noise: float, anchor_offset: float, seed: int = 0):
    """Fit and held-out accumulators of ``Y = X W_true^T + noise``, anchor ``W = W_true + offset``."""
    generator = torch.Generator().manual_seed(seed)
    W_true = torch.randn(4, 12, generator=generator, dtype=torch.float64)
    W = W_true + anchor_offset * torch.randn(4, 12, generator=generator, dtype=torch.float64)

    def accumulate(n: int) -> StatsAccumulator:
        X = torch.randn(n, 12, generator=generator, dtype=torch.float64)
        Y = X @ W_true.T + noise * torch.randn(n, 4, generator=generator, dtype=torch.float64)
        accumulator = StatsAccumulator(12, 4)
        accumulator.add(X, Y)
        return accumulator

    return accumulate(14), accumulate(400), W


@pytest.mark.parametrize(("noise", "offset", "expected"), [(5.0, 0.0, max(DAMP_GRID)), (0.0, 3.0, min(DAMP_GRID))])
def test_damp_auto_picks_the_ridge_with_the_lowest_heldout_error(noise, offset, expected):
    fit, heldout, W = constructed_layer(noise, offset)
    groups = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    support = (0, 2, 3, 5)
    moments = heldout.moments(W)
    reference = fit.problem(W, groups)
    damp, errors = choose_damp(fit.moments(W), moments, reference.kept_columns(support))
    assert set(errors) == set(DAMP_GRID) and damp == min(errors, key=errors.get)
    # each error is the held-out residual of the ridge fit, computed directly
    X_val = torch.linalg.cholesky(heldout.xtx).T  # any X with X^T X = xtx gives the same residual
    for ridge, error in errors.items():
        problem = fit.problem(W, groups, damp=ridge)
        B = problem.weights(support)
        direct = heldout.y_square - 2 * float((B.T * heldout.xty).sum()) + float((X_val @ B.T).square().sum())
        assert error == pytest.approx(direct, rel=1e-9)
        assert moments.error(B) == pytest.approx(direct, rel=1e-9)
    assert damp == expected  # noisy targets + right anchor: most ridge; clean targets + wrong anchor: least


def test_local_search_returns_the_candidate_with_the_lowest_heldout_error():
    fit, heldout, W = constructed_layer(noise=3.0, anchor_offset=0.5, seed=3)
    groups = list(range(12))
    plain = fit.problem(W, groups)
    with_heldout = fit.problem(W, groups)
    with_heldout.heldout = heldout.moments(W)
    chosen = solve(with_heldout, 5, "local-search")
    best_in_sample = solve(plain, 5, "local-search")
    assert chosen.info["heldout_candidate"] and chosen.info["heldout_candidates"] >= 2
    assert chosen.info["heldout_error"] == pytest.approx(with_heldout.heldout_error(chosen.support))
    assert with_heldout.heldout_error(chosen.support) <= with_heldout.heldout_error(best_in_sample.support) + 1e-9
    assert chosen.loss >= best_in_sample.loss - 1e-9  # held-out choice never beats the in-sample optimum in-sample


def test_score_candidates_win_when_the_in_sample_best_support_does_not_hold_out():
    """In the fit rows, inputs 4 and 5 are sums of inputs 0-3 (a correlation specific to the calibration
    text), so keeping {4, 5} reconstructs the output almost exactly in-sample; in the held-out rows the
    inputs are independent and {4, 5} fails, while the activation score's {0, 1} holds."""
    generator = torch.Generator().manual_seed(0)
    W = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.1, 0.1]], dtype=torch.float64)

    def accumulate(n: int, correlated: bool) -> StatsAccumulator:
        X = torch.randn(n, 6, generator=generator, dtype=torch.float64)
        if correlated:
            X[:, 4] = X[:, 0] + X[:, 2] + 0.01 * X[:, 4]
            X[:, 5] = X[:, 1] + X[:, 3] + 0.01 * X[:, 5]
        accumulator = StatsAccumulator(6, 1)
        accumulator.add(X, X @ W.T)
        return accumulator

    fit, heldout = accumulate(300, correlated=True), accumulate(300, correlated=False)
    problem = fit.problem(W, list(range(6)), damp=1e-6)
    assert solve(problem, 2, "local-search").support == (4, 5)  # the in-sample optimum
    problem.heldout = heldout.moments(W)
    plain = solve(problem, 2, "local-search")
    scored = solve(problem, 2, "local-search", score_candidates=True)
    assert scored.info["heldout_candidates"] > plain.info["heldout_candidates"]
    activation = solve(problem, 2, "activation").support
    error = problem.heldout_error
    assert error(scored.support) <= min(error(activation), error(plain.support)) + 1e-9
    assert error(scored.support) < 0.5 * error((4, 5))
    with pytest.raises(ValueError, match="score_candidates: expected True or False"):
        solve(problem, 2, "local-search", score_candidates="yes")


def test_problem_file_keeps_heldout_moments_and_input_variance(tmp_path):
    fit, heldout, W = constructed_layer(noise=1.0, anchor_offset=0.1)
    problem = fit.problem(W, list(range(12)), refit_bias=True, bias=torch.ones(4))
    problem.heldout = heldout.moments(W, bias=torch.ones(4), refit_bias=True)
    problem.save(tmp_path / "p.safetensors")
    loaded = LayerProblem.load(tmp_path / "p.safetensors")
    assert torch.equal(loaded.input_var, problem.input_var)
    assert loaded.heldout.rows == 400 and loaded.heldout.y_square == problem.heldout.y_square
    support = (1, 4, 7, 9)
    assert loaded.heldout_error(support) == pytest.approx(problem.heldout_error(support), rel=1e-12)


def test_prune_with_damp_auto_records_the_chosen_ridge_and_heldout_loss():
    model = tiny_model("llama")
    report = prune(model, token_ids(samples=16), {"kv_groups": 0.5, "neurons": 0.5}, damp="auto", progress=False)
    assert report.settings["damp"] == "auto" and report.settings["target"] == "pruned-input"
    for record in report.layers:
        assert record.damp in DAMP_GRID
        assert 0 < record.heldout_relative_loss < 1.5
        assert record.heldout_candidate is not None
    assert torch.isfinite(model(input_ids=token_ids(samples=2)).logits).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target": "dense"}, "target: expected one of"),
        ({"damp": "Auto"}, "damp: expected a positive finite number or 'auto'"),
        ({"damp": float("inf")}, "damp: expected a positive finite number or 'auto'"),
        ({"damp": 0.0}, "damp: expected a positive finite number or 'auto'"),
        ({"damp": "auto", "calibration": token_ids(samples=3)}, "needs at least 4 samples, got 3"),
    ],
)
def test_bad_target_or_damp_is_refused_before_pruning(options, message):
    model = tiny_model("llama")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = options.pop("calibration", token_ids())
    with pytest.raises(ValueError, match=message):
        prune(model, calibration, {"neurons": 0.5}, progress=False, **options)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_fluctuation_removes_a_large_constant_input_that_activation_keeps():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    X[:, 0] = 10.0  # large energy, no fluctuation
    X[:, 1] *= 3.0  # large fluctuation
    W = torch.ones(3, 6, dtype=torch.float64)
    problem = LayerProblem.from_activations(X, W, list(range(6)), damp=1e-9, refit_bias=True, bias=torch.zeros(3))
    by_fluctuation = solve(problem, 3, "fluctuation").support
    by_activation = solve(problem, 3, "activation").support
    assert 0 in by_activation and 0 not in by_fluctuation and 1 in by_fluctuation
    # the constant input's contribution moves into the re-fit bias: nothing is lost
    assert solve(problem, 5, "fluctuation").loss < 1e-6 * problem.c0


def test_plan_counts_problems_and_memory_before_pruning(capsys):
    model = tiny_model("llama")
    report = prune(model, token_ids(), {"neurons": 0.5}, target="dense-output", progress=True)
    plan = report.settings["plan"]
    assert plan["problems"] == len(report.layers) == 2 and plan["stages"] == 2
    assert plan["largest_columns"] == 48 and plan["samples"] == 12 and plan["tokens"]
    assert plan["activation_bytes"] == 2 * 12 * 10 * 32 * 4  # dense and pruned stage inputs, float32
    assert plan["forward_seconds"] > 0
    assert "plan: 12 x 10 = 120 calibration tokens (all distinct), 2 stages, up to 2 layer problems" in \
        capsys.readouterr().out


def test_weighted_rows_are_weighted_least_squares():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    Y = torch.randn(30, 2, generator=generator, dtype=torch.float64)
    w = torch.rand(30, generator=generator, dtype=torch.float64) + 0.1
    weighted = StatsAccumulator(6, 2)
    weighted.add(X, Y, weights=w)
    scaled = StatsAccumulator(6, 2)  # the same rows scaled by w, plus the bias column's w
    scaled.add(X * w[:, None], Y * w[:, None])
    assert torch.allclose(weighted.xtx, scaled.xtx) and torch.allclose(weighted.xty, scaled.xty)
    assert torch.allclose(weighted.x_sum, (X * w[:, None] ** 2).sum(0))
    assert weighted.mass == pytest.approx(float(w.square().sum())) and weighted.rows == 30
    W = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    problem = weighted.problem(W, list(range(6)), damp=1e-9, refit_bias=True, bias=torch.zeros(2))
    support = (0, 2, 5)
    design = torch.cat([X[:, list(support)], torch.ones(30, 1, dtype=torch.float64)], dim=1) * w[:, None]
    solution = torch.linalg.lstsq(design, Y * w[:, None]).solution  # (4, 2)
    assert torch.allclose(problem.weights(support)[:, list(support)], solution[:3].T, atol=1e-6)
    assert torch.allclose(problem.bias(support), solution[3], atol=1e-6)


def test_token_objective_prunes_every_family_and_is_recorded():
    model = tiny_model("llama")
    report = prune(model, token_ids(), {"kv_groups": 0.5, "neurons": 0.5}, objective="token", progress=False)
    assert report.settings["objective"] == "token" and len(report.layers) == 4
    with pytest.raises(ValueError, match="objective: expected one of"):
        prune(tiny_model("llama"), token_ids(), {"neurons": 0.5}, objective="tokens", progress=False)


def test_default_target_is_the_family_default():
    from tests.tiny_models import build, calibration

    llama = prune(tiny_model("llama"), token_ids(), {"neurons": 0.5}, progress=False)
    resnet = prune(build("resnet50"), calibration("resnet50"), {"channels": 0.5}, progress=False)
    assert llama.settings["target"] == "pruned-input" and llama.settings["damp"] == "auto"
    assert resnet.settings["target"] == "dense-output" and resnet.settings["damp"] == "auto"
