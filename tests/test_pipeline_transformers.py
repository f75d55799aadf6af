"""The sequential driver on tiny random models: report, saved problems, bias re-fit, solver order."""

from __future__ import annotations

import pytest
import torch

from osscar_opt.driver import prune
from osscar_opt.problem import LayerProblem
from tests.tiny_transformers import FAMILIES, output_of, tiny_model, token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_report_lists_every_pruned_layer_with_loss_and_time(family, tmp_path):
    model = tiny_model(family)
    report = prune(model, token_ids(), heads_sparsity=0.5, neurons_sparsity=0.5, backend="greedy",
                   save_problems=tmp_path, progress=False)
    assert len(report.layers) == 4 and report.seconds > 0
    assert [r.kind for r in report.layers] == ["kv-groups" if family == "llama" else "heads", "neurons"] * 2
    for record in report.layers:
        assert 0 <= record.dense_loss <= record.loss and 0 <= record.relative_loss < 1
        assert record.solve_seconds >= 0 and record.calibration_seconds > 0
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 4
    problem = LayerProblem.load(files[0])
    assert problem.meta["name"] == report.layers[0].name and int(problem.meta["keep"]) == report.layers[0].keep
    assert report.to_dict()["settings"]["family"] == family


def test_first_block_local_search_loss_is_at_most_magnitude_loss():
    losses = {}
    for backend in ("local-search", "magnitude"):
        model = tiny_model("bert")
        report = prune(model, token_ids(24), heads_sparsity=0.5, neurons_sparsity=0.5, backend=backend,
                       progress=False)
        losses[backend] = report.layers[0].loss  # same inputs for both: nothing upstream was pruned
    assert losses["local-search"] <= losses["magnitude"] * (1 + 1e-9)


def test_bias_refit_changes_the_consumer_bias_and_runs():
    model = tiny_model("opt")
    bias_before = model.model.decoder.layers[0].fc2.bias.detach().clone()
    prune(model, token_ids(), neurons_sparsity=0.5, refit_bias=True, backend="greedy", progress=False)
    assert not torch.equal(model.model.decoder.layers[0].fc2.bias, bias_before)
    assert torch.isfinite(output_of(model, token_ids(2))).all()


def test_backend_options_reach_the_backend():
    with pytest.raises(ValueError, match="no_such_option"):
        prune(tiny_model("bert"), token_ids(), heads_sparsity=0.5, backend="local-search",
              backend_options={"no_such_option": 1}, progress=False)
