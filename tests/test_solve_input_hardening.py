"""Hardening of the layer problem and the solve boundary: no silent wrong answer.

Budgets that are not integers, problems whose ``c0`` contradicts ``H`` and ``G``, inconsistent
saved files, and plug-in backends that return the wrong number of groups, non-integer ids or an
invalid bound are refused with a message naming what is wrong; built-in names are protected.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from osscar_opt import backends
from osscar_opt.backends.base import Backend, SearchResult
from osscar_opt.problem import LayerProblem
from osscar_opt.solving import solve
from tests.helpers import random_problem


@pytest.fixture
def problem() -> LayerProblem:
    return random_problem([2, 2, 2, 2, 2], outputs=3, seed=4)


@pytest.mark.parametrize("keep", [torch.tensor(2.7), torch.tensor(2.0), 2.0, np.float64(3.0), "2", True])
def test_non_integral_budgets_are_refused_not_truncated(problem, keep):
    with pytest.raises(ValueError, match="keep: expected an integer number of groups"):
        solve(problem, keep, backend="greedy")


@pytest.mark.parametrize("keep", [torch.tensor(2), np.int64(2), 2])
def test_integer_budgets_of_any_integer_type_are_accepted(problem, keep):
    assert len(solve(problem, keep, backend="greedy").support) == 2


def test_c0_below_what_the_columns_explain_is_refused_at_construction(problem):
    with pytest.raises(ValueError, match=r"c0: .* is below trace\(G\^T H\^-1 G\)"):
        LayerProblem.from_statistics(problem.H, problem.G, c0=problem.c0 * 0.1,
                                     groups=problem.group_of_column)
    # the consistent value (and anything above it: an unexplained output part) is accepted
    LayerProblem.from_statistics(problem.H, problem.G, problem.c0, problem.group_of_column)


def rewrite(path, tensors=None, metadata=None):
    """Rewrite a saved problem file with some tensors or metadata replaced."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        saved_metadata = dict(handle.metadata())
    saved = load_file(str(path))
    saved.update(tensors or {})
    saved_metadata.update(metadata or {})
    save_file(saved, str(path), metadata=saved_metadata)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metadata": {"c0": "1e-3"}}, "is below trace"),
        ({"tensors": {"xtx_diag": torch.full((10,), float("nan"), dtype=torch.float64)}}, "xtx_diag: contains NaN"),
        ({"tensors": {"weight": torch.zeros(3, 7, dtype=torch.float64)}}, r"weight: expected shape \(3, 10\)"),
        ({"tensors": {"H": torch.eye(10, dtype=torch.float64).expand(2, 10, 10).contiguous()}},
         "H: expected a square"),
        ({"metadata": {"c0": "abc"}}, "not a readable osscar_opt LayerProblem file"),
    ],
)
def test_inconsistent_saved_problem_files_are_refused_naming_the_file(problem, tmp_path, change, message):
    path = tmp_path / "layer.safetensors"
    problem.save(path)
    rewrite(path, **change)
    with pytest.raises(ValueError, match=message) as caught:
        LayerProblem.load(path)
    assert str(path) in str(caught.value)


def test_a_bias_column_inside_a_group_is_refused(problem):
    X = torch.randn(50, 4, dtype=torch.float64)
    W = torch.randn(2, 4, dtype=torch.float64)
    good = LayerProblem.from_activations(X, W, [[0, 1], [2, 3]], damp=1e-2, bias=torch.zeros(2, dtype=torch.float64))
    labels = good.group_of_column.clone()
    labels[-1] = 0  # the bias column moved into group 0
    with pytest.raises(ValueError, match="bias column"):
        LayerProblem(good.H, good.G, good.c0, labels, lam=good.lam, has_bias_column=True)


class Scripted(Backend):
    """A plug-in that returns a fixed answer."""

    answer: SearchResult

    def solve(self, problem, keep, **options):
        return self.answer


def scripted(answer: SearchResult) -> str:
    cls = type("ScriptedAnswer", (Scripted,), {"answer": answer})
    backends.register("scripted-answer", cls)
    return "scripted-answer"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (SearchResult(support=(0, 1)), r"returned 2 groups for keep=3 \(expected exactly 3\)"),
        (SearchResult(support=(0, 1, 2.0)), "integer group ids"),
        (SearchResult(support=(0, 1, 0.9 + 1)), "integer group ids"),
        (SearchResult(support="012"), "integer group ids, got the string"),
        (SearchResult(support=(0, 1, 2), lower_bound=float("nan")), "non-finite lower bound"),
        (SearchResult(support=(0, 1, 2), lower_bound=1e9), "above the loss"),
    ],
)
def test_invalid_plugin_answers_are_refused(problem, answer, message):
    name = scripted(answer)
    try:
        with pytest.raises(ValueError, match=message):
            solve(problem, 3, backend=name)
    finally:
        backends._REGISTERED.pop(name, None)


def test_a_valid_plugin_bound_gives_an_honest_gap(problem):
    name = scripted(SearchResult(support=(0, 1, 2), lower_bound=0.0, status="time_limit"))
    try:
        solution = solve(problem, 3, backend=name)
    finally:
        backends._REGISTERED.pop(name, None)
    assert solution.lower_bound == 0.0 and solution.gap == pytest.approx(1.0)
    assert solution.status == "time_limit"


def test_registering_a_built_in_name_needs_replace(problem):
    class Other(Backend):
        def solve(self, problem, keep, **options):
            return tuple(range(keep))

    with pytest.raises(ValueError, match="'greedy' is a built-in backend"):
        backends.register("greedy", Other)
    assert backends.get("greedy").__name__ == "GreedyBackend"
    backends.register("greedy", Other, replace=True)
    try:
        assert backends.get("greedy") is Other
    finally:
        backends._REGISTERED.pop("greedy", None)
    assert backends.get("greedy").__name__ == "GreedyBackend"


@pytest.mark.parametrize("damp", [1e-12, 1e-10, 1e-8])
def test_local_search_is_not_misled_by_near_singular_problems(damp):
    # 24 columns repeating 6 distinct ones: keeping one copy of each explains everything (relative
    # loss ~ the ridge); low-rank updates that add a duplicate divide round-off by round-off
    worst = 0.0
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        base = torch.randn(200, 6, generator=generator, dtype=torch.float64)
        W = torch.randn(5, 24, generator=generator, dtype=torch.float64)
        problem = LayerProblem.from_activations(base.repeat(1, 4), W, [[i] for i in range(24)], damp=damp)
        solution = solve(problem, 6, backend="local-search")
        assert sorted(g % 6 for g in solution.support) == list(range(6)), (seed, solution.support)
        worst = max(worst, solution.loss / problem.c0)
    assert worst < 1e3 * damp


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (["ab", "cd"], "group 0 must be a list of column indices"),
        ([[0, [1]], [2, 3]], "group 0 must be a flat list of integer column indices"),
        ([[0, 1], [2, "3"]], "group 1 must be a flat list of integer column indices"),
        ([[0, 1], [2, 3.0]], "group 1 must be a flat list of integer column indices"),
        ("0011", "expected a list of column-index lists or a group_of_column vector"),
    ],
)
def test_malformed_groups_are_named_errors(groups, message):
    X, W = torch.randn(50, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        LayerProblem.from_activations(X, W, groups, damp=1e-2)


@pytest.mark.parametrize("damp", [float("inf"), float("nan"), 0.0, -1.0])
def test_a_non_finite_or_non_positive_ridge_is_blamed_on_damp(damp):
    X, W = torch.randn(50, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="damp: expected a positive finite number"):
        LayerProblem.from_activations(X, W, [[0, 1], [2, 3]], damp=damp)
