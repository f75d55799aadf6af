"""``multiple_of`` / ``--multiple-of``: kept neurons and channels in multiples of N for uniform sparsities
and cost targets (heads and KV groups left alone), the target still met, bad values and widths no
multiple can reach refused before any layer is cut."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from osscar_opt import cli
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.budget import CostTarget, UniformSparsity, aligned_keep
from osscar_opt.costs import model_cost
from osscar_opt.curves import keep_grid
from osscar_opt.pipeline import prune, prune_vision
from tests.tiny_llms import calibration, tiny_llm
from tests.tiny_models import small_vision_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def widths(model) -> dict[str, tuple[str, int]]:
    return {s.name: (s.kind, s.num_groups) for s in adapter_for(model).structures()}


def test_the_rounding_rule_and_the_aligned_curve_grid():
    assert [aligned_keep(k, 96, 8) for k in (1, 4, 11, 12, 67, 95, 96)] == [8, 8, 8, 16, 64, 96, 96]
    assert keep_grid(96, 32, 1, 8) == list(range(8, 97, 8))
    grid = keep_grid(1536, 32, 1, 64)
    assert all(k % 64 == 0 for k in grid) and grid[-1] == 1536 and len(grid) <= 33
    assert keep_grid(96, 4, 30, 8)[0] == 32  # min_keep respected, rounded up to a multiple
    assert keep_grid(96, 32, 1, 1) == keep_grid(96, 32, 1)  # unchanged without a multiple


def test_uniform_sparsity_keeps_multiples_of_n_and_leaves_kv_groups_alone():
    model = tiny_llm("llama")
    report = prune(model, calibration(), UniformSparsity({"kv_groups": 0.5, "neurons": 0.3}, multiple_of=8),
                   backend="greedy", damp=0.01, progress=False)
    for block in model.model.layers:
        assert block.mlp.down_proj.in_features == 64  # 96 - round(0.3 * 96) = 67 -> 64
        assert block.self_attn.k_proj.out_features == 16  # 1 of 2 KV groups, as asked
    assert report.settings["budgets"]["multiple_of"] == 8


def test_a_cost_target_with_multiple_of_meets_the_target_with_aligned_widths():
    dense = tiny_llm("llama")
    model = copy.deepcopy(dense)
    target = CostTarget("macs", 0.6, normalize="relative", multiple_of=16)
    report = prune(model, calibration(), target, backend="greedy", damp=0.01, progress=False)
    kinds = widths(dense)
    keeps = report.settings["allocation"]["keep"]
    assert any(keep < kinds[name][1] for name, keep in keeps.items() if kinds[name][0] == "neurons")
    for name, keep in keeps.items():
        if kinds[name][0] == "neurons":
            assert keep % 16 == 0
    batch = calibration()[:4]
    achieved = model_cost(model, batch, "macs") / model_cost(dense, batch, "macs")
    assert 0.6 - 0.02 <= achieved <= 0.6 + 1e-12


def test_vision_channels_are_multiples_of_n():
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pruned, report = prune_vision(small_vision_model("mobilenet_v2"), images,
                                  UniformSparsity({"channels": 0.3}, multiple_of=4), backend="magnitude",
                                  batch_size=4, progress=False)
    dense = widths(small_vision_model("mobilenet_v2"))
    assert all(record.keep % 4 == 0 or record.keep == dense[record.name][1] for record in report.layers)


@pytest.mark.parametrize("value", [0, -8, 1.5, True, "8"])
def test_a_multiple_that_is_not_a_positive_integer_is_refused(value):
    with pytest.raises(ValueError, match=f"multiple_of: expected a positive integer, got {re.escape(repr(value))}"):
        UniformSparsity({"neurons": 0.3}, multiple_of=value)
    with pytest.raises(ValueError, match="multiple_of: expected a positive integer"):
        CostTarget("macs", 0.6, multiple_of=value)


def test_a_multiple_wider_than_a_structure_is_refused_before_pruning():
    model = tiny_llm("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"multiple_of: 128 is wider than model.layers.0.mlp.down_proj \(96 groups\)"):
        prune(model, calibration(), UniformSparsity({"neurons": 0.3}, multiple_of=128), backend="greedy",
              progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_target_no_aligned_widths_reach_is_refused_with_the_smallest_cost():
    model = tiny_llm("llama")
    before = copy.deepcopy(model.state_dict())
    target = CostTarget("macs", 0.3, normalize="relative", kinds=["neurons"], multiple_of=32)
    with pytest.raises(ValueError, match=r"cannot be met: .*neurons and channels in multiples of 32\) the model "
                                         r"reaches only ([0-9.]+) of its dense macs.*or multiple_of"):
        prune(model, calibration(), target, backend="greedy", damp=0.01, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("value", ["0", "-4"])
def test_the_command_refuses_a_bad_multiple_before_loading(value, capsys):
    assert cli.main(["prune", "--multiple-of", value, "--neurons-sparsity", "0.3"]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert f"--multiple-of: expected a positive integer, got {value}" in err and err.count("\n") == 1
