"""Surgery on every family (tiny BERT / OPT / LLaMA-GQA / GPT-2, small ResNet-50 / MobileNetV2):
exactness, zeroed groups, in-place cuts; then shapes and head counts of the pruned transformers."""

from __future__ import annotations

import pytest
import torch

from osscar_opt.accumulator import StatsAccumulator
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.budget import keep_count
from osscar_opt.formulations.surgery import apply_solution
from osscar_opt.pipeline import prune
from osscar_opt.solving import solve
from tests.tiny_models import MODELS, KeepEverything, budgets, build, calibration, output, relative_error
from tests.tiny_transformers import output_of, tiny_model, token_ids


def _structures(model):
    """``(stage index, stage module, structure)`` for every prunable structure, in pruning order."""
    for index, stage in enumerate(adapter_for(model).stages()):
        for structure in stage.structures(stage.module):
            yield index, stage.module, structure


@pytest.mark.parametrize("name", MODELS)
def test_keep_all_with_dense_weights_reproduces_dense_output_exactly(name):
    model, data = build(name), calibration(name)
    dense = output(model, data)
    for _, _, structure in list(_structures(model)):
        apply_solution(structure, range(structure.num_groups), structure.weight())
    assert torch.equal(output(model, data), dense)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_keep_all_solution_of_the_layer_problem_reproduces_dense_output(name):
    model, data = build(name), calibration(name)
    dense = output(model, data)
    for _, _, structure in list(_structures(model)):
        accumulator = StatsAccumulator(structure.in_features)
        rows = max(200, 2 * structure.in_features)
        accumulator.add(torch.randn(rows, structure.in_features, generator=torch.Generator().manual_seed(1)))
        problem = accumulator.problem(structure.weight(), structure.groups)
        solution = solve(problem, problem.num_groups, "local-search")
        apply_solution(structure, solution.support, solution.weights)
    torch.testing.assert_close(output(model, data), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_pipeline_refuses_zero_sparsity_and_leaves_the_model_unchanged(name):
    model, data = build(name), calibration(name)
    dense = output(model, data)
    with pytest.raises(ValueError, match="prunes nothing"):
        prune(model, data, budgets(name, 0.0), batch_size=4, progress=False)
    assert torch.equal(output(model, data), dense)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_pipeline_keeping_every_group_reproduces_the_dense_output(name):
    model, data = build(name), calibration(name)
    dense = output(model, data)
    groups = {structure.name: structure.num_groups for _, _, structure in _structures(model)}
    report = prune(model, data, KeepEverything(), batch_size=4, progress=False)
    assert {record.name: record.keep for record in report.layers} == groups
    assert all(record.kept == list(range(record.groups)) for record in report.layers)
    assert relative_error(output(model, data), dense) < 1e-5


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("structure_index", [0, 1])  # transformers: attention group, MLP neuron
def test_pruning_a_zeroed_group_leaves_the_output_unchanged(name, structure_index):
    model, data = build(name), calibration(name)
    # q_heads keep equal counts per KV group: dropping one query head alone is not a valid cut
    stage, block, structure = [item for item in _structures(model) if item[2].kind != "q_heads"][structure_index]
    victim = 1
    with torch.no_grad():
        structure.weight()[:, structure.groups[victim]] = 0.0  # a view: zeroes the layer's weight
    before = output(model, data)
    support = [g for g in range(structure.num_groups) if g != victim]
    apply_solution(structure, support, structure.weight())
    after = output(model, data)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    # cut in place: the model still holds the same module objects, now smaller
    assert adapter_for(model).stages()[stage].module is block
    assert model.get_submodule(structure.name) is structure.consumer
    after_cut = [s for s in adapter_for(model).structures() if s.kind != "q_heads"][structure_index]
    assert after_cut.num_groups == structure.num_groups - 1


def _zero_all_but_survivors(model, sparsity: float) -> dict[str, list[int]]:
    """Zero the consumer columns of every group but the ``keep_count`` survivors (every other group)."""
    survivors = {}
    for _, _, structure in [item for item in _structures(model) if item[2].kind != "q_heads"]:
        keep = keep_count(structure.num_groups, sparsity)
        kept = list(range(0, 2 * keep, 2))
        with torch.no_grad():
            weight = structure.weight()
            for group in set(range(structure.num_groups)) - set(kept):
                weight[:, structure.groups[group]] = 0.0
        survivors[structure.name] = kept
    return survivors


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_pipeline_prunes_exactly_the_zeroed_groups_and_changes_nothing(name):
    model, data = build(name, seed=2), calibration(name)
    survivors = _zero_all_but_survivors(model, 0.5)
    before = output(model, data)
    report = prune(model, data, budgets(name, 0.5), backend="magnitude", batch_size=4, progress=False)
    assert {record.name: record.kept for record in report.layers} == survivors
    assert relative_error(output(model, data), before) < 1e-5


# ------------------------------------------------------------------ transformers: shapes and head counts
def test_bert_shapes_and_head_counts_after_pruning():
    model = tiny_model("bert")
    prune(model, token_ids(), {"heads": 0.5, "neurons": 0.25}, backend="greedy", progress=False)
    for layer in model.encoder.layer:
        attention = layer.attention.self
        assert attention.num_attention_heads == 2 and attention.all_head_size == 2 * 8
        assert attention.query.weight.shape == (16, 32) and attention.key.bias.shape == (16,)
        assert layer.attention.output.dense.weight.shape == (32, 16)
        assert layer.intermediate.dense.weight.shape == (36, 32)
        assert layer.output.dense.weight.shape == (32, 36)
    assert model.config.num_attention_heads == 4  # the config stays dense; modules carry the sizes
    assert output_of(model, token_ids(2)).shape == (2, 10, 32)


def test_opt_shapes_and_head_counts_after_pruning():
    model = tiny_model("opt")
    prune(model, token_ids(), {"heads": 0.25, "neurons": 0.5}, backend="greedy", progress=False)
    for layer in model.model.decoder.layers:
        assert layer.self_attn.num_heads == 3
        assert layer.self_attn.q_proj.weight.shape == (24, 32)
        assert layer.self_attn.out_proj.weight.shape == (32, 24)
        assert layer.fc1.weight.shape == (24, 32) and layer.fc2.weight.shape == (32, 24)
    generated = model.generate(token_ids(1, 4), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


def test_llama_gqa_pruning_removes_whole_kv_groups():
    model = tiny_model("llama")
    prune(model, token_ids(), {"kv_groups": 0.5, "neurons": 0.5}, backend="greedy", progress=False)
    for layer in model.model.layers:
        attention = layer.self_attn
        head_dim = attention.head_dim
        assert attention.k_proj.out_features == head_dim  # one KV head left of two
        assert attention.v_proj.out_features == head_dim
        assert attention.q_proj.out_features == 2 * head_dim  # its two query heads
        assert attention.o_proj.in_features == 2 * head_dim
        assert attention.num_key_value_groups == 2
        assert layer.mlp.down_proj.in_features == 24 and layer.mlp.intermediate_size == 24
    generated = model.generate(token_ids(1, 4), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


def test_gpt2_pruning_keeps_conv1d_layers_and_splits_the_fused_projection():
    from transformers.pytorch_utils import Conv1D

    model = tiny_model("gpt2")
    prune(model, token_ids(), {"heads": 0.5, "neurons": 0.25}, backend="greedy", progress=False)
    for layer in model.transformer.h:
        attention = layer.attn
        assert attention.num_heads == 2 and attention.split_size == 2 * attention.head_dim == 16
        assert isinstance(attention.c_attn, Conv1D) and attention.c_attn.weight.shape == (32, 48)
        assert attention.c_proj.weight.shape == (16, 32) and attention.c_proj.nx == 16
        assert layer.mlp.c_fc.weight.shape == (32, 36) and layer.mlp.c_proj.weight.shape == (36, 32)
    generated = model.generate(token_ids(1, 4), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


def test_gpt2_fused_projection_keeps_query_key_value_rows_of_the_same_heads():
    model = tiny_model("gpt2")
    attention = model.transformer.h[0].attn
    width = attention.split_size
    dense = attention.c_attn.weight.detach().clone()  # (in, 3 * width)
    structure = adapter_for(model).attention(model.transformer.h[0], "transformer.h.0")
    apply_solution(structure, [1, 3], structure.weight())
    head = attention.head_dim
    kept = [c for h in (1, 3) for c in range(h * head, (h + 1) * head)]
    expected = torch.cat([dense[:, [segment * width + c for c in kept]] for segment in range(3)], dim=1)
    assert torch.equal(attention.c_attn.weight, expected)
