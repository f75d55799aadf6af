"""The pipeline on tiny random transformers: report, bias re-fit, solver order, options, bad input."""

from __future__ import annotations

import pytest
import torch

from osscar_opt.budget import keep_count
from osscar_opt.pipeline import prune
from tests.tiny_transformers import FAMILIES, output_of, tiny_model, token_ids


def budgets(heads: float = 0.0, neurons: float = 0.0) -> dict[str, float]:
    """Heads and (GQA) key-value groups at the same sparsity, as ``osscar prune --heads-sparsity`` does."""
    return {"heads": heads, "kv_groups": heads, "neurons": neurons}


@pytest.mark.parametrize("family", FAMILIES)
def test_report_lists_every_pruned_layer_with_loss_and_time(family):
    model = tiny_model(family)
    report = prune(model, token_ids(), budgets(0.5, 0.5), backend="greedy", progress=False)
    assert len(report.layers) == 4 and report.seconds > 0
    assert [r.kind for r in report.layers] == ["kv_groups" if family == "llama" else "heads", "neurons"] * 2
    assert [r.stage for r in report.layers] == [0, 0, 1, 1]
    for record in report.layers:
        assert 0 <= record.dense_loss <= record.loss and 0 <= record.relative_loss < 1
        assert record.solve_seconds >= 0 and record.calibration_seconds > 0
        assert record.keep == keep_count(record.groups, 0.5) == len(record.kept)
        assert set(record.kept) <= set(range(record.groups)) and record.backend == "greedy"
    document = report.to_dict()
    assert [layer["name"] for layer in document["layers"]] == [r.name for r in report.layers]
    settings = document["settings"]
    assert settings["family"] == settings["architecture"] == family
    assert settings["budgets"] == budgets(0.5, 0.5)
    assert settings["samples"] == 12 and settings["sample_shape"] == [10]


def test_first_block_local_search_loss_is_at_most_magnitude_loss():
    losses = {}
    for backend in ("local-search", "magnitude"):
        model = tiny_model("bert")
        # a fixed ridge: under damp="auto" each backend's loss would be at its own chosen ridge
        report = prune(model, token_ids(24), budgets(0.5, 0.5), backend=backend, damp=1e-2, progress=False)
        losses[backend] = report.layers[0].loss  # same inputs for both: nothing upstream was pruned
    assert losses["local-search"] <= losses["magnitude"] * (1 + 1e-9)


def test_bias_refit_changes_the_consumer_bias_and_runs():
    model = tiny_model("opt")
    bias_before = model.model.decoder.layers[0].fc2.bias.detach().clone()
    prune(model, token_ids(), budgets(neurons=0.5), refit_bias=True, backend="greedy", progress=False)
    assert not torch.equal(model.model.decoder.layers[0].fc2.bias, bias_before)
    assert torch.isfinite(output_of(model, token_ids(2))).all()


def test_bias_refit_leaves_bias_free_transformer_consumers_without_a_bias():
    """A transformers config cannot record a bias the stock class does not have, so none is added."""
    model = tiny_model("llama")  # no bias anywhere in the attention output or the MLP
    report = prune(model, token_ids(), budgets(0.5, 0.5), refit_bias=True, backend="greedy", progress=False)
    assert len(report.layers) == 4
    for layer in model.model.layers:
        assert layer.self_attn.o_proj.bias is None and layer.mlp.down_proj.bias is None
    assert torch.isfinite(output_of(model, token_ids(2))).all()


def test_backend_options_reach_the_backend():
    with pytest.raises(ValueError, match="no_such_option"):
        prune(tiny_model("bert"), token_ids(), budgets(heads=0.5), backend="local-search",
              backend_options={"no_such_option": 1}, progress=False)


def test_pipeline_rejects_bad_calibration_sparsity_and_batch_size():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="calibration"):
        prune(model, torch.zeros(0, 5, dtype=torch.int64), budgets(heads=0.5), progress=False)
    with pytest.raises(ValueError, match="calibration"):
        prune(model, torch.rand(4, 5), budgets(heads=0.5), progress=False)  # floats are not token ids
    with pytest.raises(ValueError, match=r"budgets\['heads'\]"):
        prune(model, token_ids(), budgets(heads=1.5), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        prune(model, token_ids(), budgets(heads=0.5), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="damp"):
        prune(model, token_ids(), budgets(heads=0.5), damp=0.0, progress=False)
