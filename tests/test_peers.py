"""The Torch-Pruning peer on the tiny GQA LLaMA: our shapes, its importance, no re-fit, bad input."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch

from osscar_opt.budget import keep_count
from osscar_opt.peers.torch_pruning import prune_with_torch_pruning
from osscar_opt.pipeline import prune
from tests.tiny_transformers import VOCAB, output_of, tiny_model, token_ids

needs_torch_pruning = pytest.mark.skipif(
    importlib.util.find_spec("torch_pruning") is None, reason="needs torch-pruning (pip install torch-pruning)"
)


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def calibration(importance: str) -> torch.Tensor | None:
    return token_ids() if importance == "taylor" else None


@needs_torch_pruning
@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
@pytest.mark.parametrize(("kv", "neurons"), [(0.5, 0.25), (0.0, 0.5), (0.5, 0.0)])
def test_prunes_in_place_to_the_shapes_of_our_pipeline_at_the_same_budgets(importance, kv, neurons):
    model = tiny_model("llama")
    ours = copy.deepcopy(model)
    prune(ours, token_ids(), {"kv_groups": kv, "neurons": neurons}, backend="magnitude", progress=False)

    result = prune_with_torch_pruning(
        model, calibration(importance), kv_sparsity=kv, neuron_sparsity=neurons, importance=importance, batch_size=5
    )

    assert shapes(model) == shapes(ours)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ours.parameters())
    kv_kept, neurons_kept = keep_count(2, kv), keep_count(48, neurons)
    assert result["method"] == "torch-pruning" and result["importance"] == importance
    kept = (result["kv_groups_kept"], result["heads_kept"], result["neurons_kept"])
    assert kept == (kv_kept, 2 * kv_kept, neurons_kept)
    assert result["seconds"] > 0
    config = model.config
    assert (config.num_key_value_heads, config.num_attention_heads) == (kv_kept, 2 * kv_kept)
    assert (config.intermediate_size, config.head_dim) == (neurons_kept, 8)
    for layer in model.model.layers:
        assert layer.self_attn.head_dim == 8 and layer.self_attn.num_key_value_groups == 2
        assert layer.mlp.intermediate_size == neurons_kept
    logits = output_of(model, token_ids(3))
    assert logits.shape == (3, 10, VOCAB) and torch.isfinite(logits).all()
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@needs_torch_pruning
def test_magnitude_removes_the_weakest_kv_group_and_neurons_and_keeps_the_rest_unchanged():
    model = tiny_model("llama")
    layer = model.model.layers[0]
    weak_neurons = [3, 10, 40]
    with torch.no_grad():  # KV group 1 = query heads 2, 3 (rows 16..31) and KV head 1 (rows 8..15)
        layer.self_attn.q_proj.weight[16:] *= 0.01
        layer.self_attn.k_proj.weight[8:] *= 0.01
        layer.self_attn.v_proj.weight[8:] *= 0.01
        layer.self_attn.o_proj.weight[:, 16:] *= 0.01
        layer.mlp.gate_proj.weight[weak_neurons] *= 0.01
        layer.mlp.up_proj.weight[weak_neurons] *= 0.01
        layer.mlp.down_proj.weight[:, weak_neurons] *= 0.01
    before = snapshot(model)

    prune_with_torch_pruning(model, None, kv_sparsity=0.5, neuron_sparsity=3 / 48)

    kept = [i for i in range(48) if i not in weak_neurons]
    prefix = "model.layers.0."
    assert torch.equal(layer.self_attn.q_proj.weight, before[prefix + "self_attn.q_proj.weight"][:16])
    assert torch.equal(layer.self_attn.k_proj.weight, before[prefix + "self_attn.k_proj.weight"][:8])
    assert torch.equal(layer.self_attn.v_proj.weight, before[prefix + "self_attn.v_proj.weight"][:8])
    assert torch.equal(layer.self_attn.o_proj.weight, before[prefix + "self_attn.o_proj.weight"][:, :16])
    assert torch.equal(layer.mlp.gate_proj.weight, before[prefix + "mlp.gate_proj.weight"][kept])
    assert torch.equal(layer.mlp.down_proj.weight, before[prefix + "mlp.down_proj.weight"][:, kept])
    untouched = [name for name in before if "proj" not in name]
    assert untouched and all(torch.equal(model.state_dict()[name], before[name]) for name in untouched)


@needs_torch_pruning
def test_taylor_restores_frozen_parameters_and_leaves_no_gradients():
    model = tiny_model("llama").requires_grad_(False)
    with torch.no_grad():
        prune_with_torch_pruning(model, token_ids(), kv_sparsity=0.5, neuron_sparsity=0.5, importance="taylor")
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert torch.isfinite(output_of(model, token_ids(2))).all()


@needs_torch_pruning
def test_taylor_and_magnitude_use_different_information():
    """Taylor reads the calibration loss; on a random model it need not agree with the weight norms."""
    kept = {}
    for importance in ("magnitude", "taylor"):
        model = tiny_model("llama", seed=3)
        prune_with_torch_pruning(
            model, calibration(importance), kv_sparsity=0.0, neuron_sparsity=0.5, importance=importance
        )
        kept[importance] = model.model.layers[0].mlp.down_proj.weight.clone()
    assert not torch.equal(kept["magnitude"], kept["taylor"])


BAD_INPUT = [
    ("kv_sparsity", dict(kv_sparsity=1.0)),
    ("neuron_sparsity", dict(neuron_sparsity=1.0)),
    ("neuron_sparsity", dict(neuron_sparsity=-0.1)),
    ("kv_sparsity", dict(kv_sparsity="0.5")),
    ("importance", dict(importance="wanda")),
    ("calibration_ids", dict(importance="taylor", calibration_ids=None)),
    ("calibration_ids", dict(importance="taylor", calibration_ids=torch.rand(4, 10))),
    ("calibration_ids", dict(importance="taylor", calibration_ids=token_ids() + VOCAB)),
    ("batch_size", dict(importance="taylor", batch_size=0)),
    ("model", dict(model="bert")),
]


@pytest.mark.parametrize(("argument", "change"), BAD_INPUT, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_INPUT)])
def test_bad_input_raises_a_value_error_naming_the_argument_before_anything_changes(argument, change):
    change = dict(change)
    model = tiny_model(change.pop("model", "llama"))
    arguments = dict(calibration_ids=token_ids(), kv_sparsity=0.5, neuron_sparsity=0.5) | change
    before, config_before = snapshot(model), model.config.to_dict()

    with pytest.raises(ValueError, match=f"^{argument}"):
        prune_with_torch_pruning(model, arguments.pop("calibration_ids"), **arguments)

    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.to_dict() == config_before


def test_missing_torch_pruning_asks_for_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ImportError, match="pip install torch-pruning"):
        prune_with_torch_pruning(model, None, kv_sparsity=0.5, neuron_sparsity=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
