"""Surgery on tiny random BERT / OPT / LLaMA-GQA: exactness, zeroed groups, shapes and head counts."""

from __future__ import annotations

import pytest
import torch

from osscar_opt.adapters.base import adapter_for
from osscar_opt.driver import prune
from osscar_opt.solving import solve
from osscar_opt.statistics import StatsAccumulator
from osscar_opt.surgery import apply_solution
from tests.tiny_transformers import FAMILIES, output_of, tiny_model, token_ids


def _structures(model):
    adapter = adapter_for(model)
    for index, block in enumerate(adapter.blocks()):
        prefix = adapter.block_name(index)
        yield block, adapter.attention(block, prefix)
        yield block, adapter.mlp(block, prefix)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_with_dense_weights_reproduces_dense_output_exactly(family):
    model = tiny_model(family)
    ids = token_ids()
    dense = output_of(model, ids)
    for block, structure in list(_structures(model)):
        apply_solution(block, structure, range(structure.num_groups), structure.weight())
    assert torch.equal(output_of(model, ids), dense)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_solution_of_the_layer_problem_reproduces_dense_output(family):
    model = tiny_model(family)
    ids = token_ids()
    dense = output_of(model, ids)
    for block, structure in list(_structures(model)):
        accumulator = StatsAccumulator(structure.in_features)
        accumulator.add(torch.randn(200, structure.in_features, generator=torch.Generator().manual_seed(1)))
        problem = accumulator.problem(structure.weight(), structure.groups)
        solution = solve(problem, problem.num_groups, "local-search")
        apply_solution(block, structure, solution.support, solution.weights)
    torch.testing.assert_close(output_of(model, ids), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_driver_with_zero_sparsity_leaves_the_model_unchanged(family):
    model = tiny_model(family)
    ids = token_ids()
    dense = output_of(model, ids)
    report = prune(model, ids, heads_sparsity=0.0, neurons_sparsity=0.0, progress=False)
    assert report.layers == []
    assert torch.equal(output_of(model, ids), dense)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("structure_index", [0, 1])  # 0: attention group, 1: MLP neuron
def test_pruning_a_zeroed_group_leaves_the_output_unchanged(family, structure_index):
    model = tiny_model(family)
    ids = token_ids()
    block, structure = list(_structures(model))[structure_index]
    victim = 1
    with torch.no_grad():
        structure.weight()[:, structure.groups[victim]] = 0.0  # a view: zeroes the layer's weight
    before = output_of(model, ids)
    support = [g for g in range(structure.num_groups) if g != victim]
    apply_solution(block, structure, support, structure.weight())
    after = output_of(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert adapter_for(model).blocks()[0] is block


def test_bert_shapes_and_head_counts_after_pruning():
    model = tiny_model("bert")
    prune(model, token_ids(), heads_sparsity=0.5, neurons_sparsity=0.25, backend="greedy", progress=False)
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
    prune(model, token_ids(), heads_sparsity=0.25, neurons_sparsity=0.5, backend="greedy", progress=False)
    for layer in model.model.decoder.layers:
        assert layer.self_attn.num_heads == 3
        assert layer.self_attn.q_proj.weight.shape == (24, 32)
        assert layer.self_attn.out_proj.weight.shape == (32, 24)
        assert layer.fc1.weight.shape == (24, 32) and layer.fc2.weight.shape == (32, 24)
    generated = model.generate(token_ids(1, 4), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


def test_llama_gqa_pruning_removes_whole_kv_groups():
    model = tiny_model("llama")
    prune(model, token_ids(), heads_sparsity=0.5, neurons_sparsity=0.5, backend="greedy", progress=False)
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
    prune(model, token_ids(), heads_sparsity=0.5, neurons_sparsity=0.25, backend="greedy", progress=False)
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
    apply_solution(model.transformer.h[0], structure, [1, 3], structure.weight())
    head = attention.head_dim
    kept = [c for h in (1, 3) for c in range(h * head, (h + 1) * head)]
    expected = torch.cat([dense[:, [segment * width + c for c in kept]] for segment in range(3)], dim=1)
    assert torch.equal(attention.c_attn.weight, expected)
