"""Conv channels as a Structure: unfolded patches against the direct convolution, the layer problem
built from them, and bad consumers / producers / inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from osscar_opt.accumulator import StatsAccumulator
from osscar_opt.formulations.conv import channel_structure
from osscar_opt.formulations.layers import conv_output_rows, kernel_area, unfold_inputs, weight_matrix
from osscar_opt.formulations.surgery import apply_solution

CONV_SHAPES = [
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": (3, 2), "stride": (1, 2), "padding": (2, 0), "dilation": (2, 1)},
    {"kernel_size": 1, "stride": 1, "padding": 0},
    {"kernel_size": 3, "stride": 2, "padding": 2, "dilation": 2, "bias": True},
]


def make_conv(seed: int, in_channels: int = 5, out_channels: int = 4, **shape) -> nn.Conv2d:
    torch.manual_seed(seed)
    shape.setdefault("bias", False)
    return nn.Conv2d(in_channels, out_channels, **shape).double()


def current_bias(conv: nn.Conv2d) -> torch.Tensor | None:
    return None if conv.bias is None else conv.bias.detach()


def kept_conv_weight(weights: torch.Tensor, conv: nn.Conv2d, kept: torch.Tensor) -> torch.Tensor:
    """The ``(C_out, len(kept), kh, kw)`` weight of a pruned conv from a problem's ``(m, p)`` weights."""
    return weights.reshape(conv.out_channels, conv.in_channels, *conv.kernel_size)[:, kept].to(conv.weight.dtype)


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_unfold_times_weight_is_the_convolution(shape):
    conv = make_conv(0, **shape)
    x = torch.randn(3, conv.in_channels, 9, 8, dtype=torch.float64)
    rows = unfold_inputs(conv, x) @ weight_matrix(conv).T
    if conv.bias is not None:
        rows = rows + conv.bias.detach()
    assert torch.allclose(rows, conv_output_rows(conv(x)), atol=1e-12)
    structure = channel_structure("conv", conv, [])
    area = kernel_area(conv)
    assert structure.kind == "channels" and structure.num_groups == conv.in_channels
    assert structure.groups[:2] == [list(range(area)), list(range(area, 2 * area))]  # channel-major columns
    assert structure.in_features == conv.in_channels * area and structure.out_features == conv.out_channels
    assert torch.equal(structure.input_rows(x), unfold_inputs(conv, x))
    assert torch.equal(structure.output_rows(conv(x)), conv_output_rows(conv(x)))
    assert torch.equal(structure.weight(), weight_matrix(conv))
    assert weight_matrix(conv).shape == (conv.out_channels, conv.in_channels * area)


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_problem_loss_equals_direct_conv_residual(shape):
    """loss(S) = ||Y - conv_S(x)||^2 + lam ||W - What||^2 with conv_S the pruned conv built from
    the solution's weights, Y the output of a different (dense) conv on other inputs."""
    conv = make_conv(1, **shape)
    dense = make_conv(2, **shape)
    x_batches = [torch.randn(2, 5, 9, 8, dtype=torch.float64) for _ in range(3)]
    x_dense = [x + 0.1 * torch.randn_like(x) for x in x_batches]
    structure = channel_structure("conv", conv, [])
    accumulator = StatsAccumulator(structure.in_features, structure.out_features)
    with torch.no_grad():
        for x, xd in zip(x_batches, x_dense, strict=True):
            accumulator.add(structure.input_rows(x), structure.output_rows(dense(xd)))
    problem = accumulator.problem(structure.weight(), structure.groups, damp=1e-2, bias=current_bias(conv))
    support = (0, 2, 3)
    kept = torch.tensor(support)
    weights = problem.weights(support)
    pruned = nn.Conv2d(len(support), conv.out_channels, **{**shape, "bias": conv.bias is not None}).double()
    pruned.weight.data = kept_conv_weight(weights, conv, kept)
    if conv.bias is not None:
        pruned.bias.data = conv.bias.detach().clone()
    with torch.no_grad():
        pairs = zip(x_batches, x_dense, strict=True)
        residual = sum(float((dense(xd) - pruned(x[:, kept])).square().sum()) for x, xd in pairs)
    ridge = problem.lam * float((weight_matrix(conv) - weights).square().sum())
    assert problem.loss(support) == pytest.approx(residual + ridge, rel=1e-9)
    assert problem.num_groups == conv.in_channels


def test_streaming_equals_one_batch():
    conv = make_conv(3, kernel_size=3, stride=2, padding=1)
    structure = channel_structure("conv", conv, [])
    x = torch.randn(6, 5, 7, 7, dtype=torch.float64)
    one, many = StatsAccumulator(structure.in_features), StatsAccumulator(structure.in_features)
    one.add(structure.input_rows(x))
    for part in x.split(2):
        many.add(structure.input_rows(part))
    assert one.rows == many.rows == 6 * 4 * 4
    a, b = (acc.problem(structure.weight(), structure.groups) for acc in (one, many))
    assert torch.allclose(a.H, b.H) and torch.allclose(a.G, b.G)


def test_keep_all_recovers_the_weight():
    conv = make_conv(4, kernel_size=3, padding=1, bias=True)
    structure = channel_structure("conv", conv, [])
    accumulator = StatsAccumulator(structure.in_features, structure.out_features)
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        accumulator.add(structure.input_rows(x), structure.output_rows(conv(x)))
    problem = accumulator.problem(structure.weight(), structure.groups, bias=current_bias(conv), refit_bias=True)
    everything = range(problem.num_groups)
    assert torch.allclose(problem.weights(everything), weight_matrix(conv), atol=1e-8)
    assert torch.allclose(problem.bias(everything), conv.bias.detach(), atol=1e-8)


def test_producers_lose_the_consumer_channels():
    torch.manual_seed(5)
    conv, bn, consumer = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1)
    depthwise = nn.Conv2d(6, 6, 3, groups=6)
    chain = nn.Sequential(conv, bn, nn.ReLU(), depthwise, consumer).eval()
    structure = channel_structure("consumer", consumer, [("conv", conv), ("bn", bn), ("depthwise", depthwise)])
    assert [producer.module for producer in structure.producers] == [conv, bn, depthwise]
    assert all(producer.rows == [[c] for c in range(6)] for producer in structure.producers)
    kept = [0, 2, 5]
    with torch.no_grad():
        structure.weight()[:, [c for c in range(6) if c not in kept]] = 0.0  # 1x1 kernel: one column each
        x = torch.randn(2, 3, 7, 7)
        before = chain(x)
        apply_solution(structure, kept, structure.weight())
        torch.testing.assert_close(chain(x), before)
    assert conv.out_channels == bn.num_features == depthwise.groups == depthwise.out_channels == 3
    assert consumer.in_channels == 3 and consumer.weight.shape == (2, 3, 1, 1)


def test_bad_consumers_producers_and_inputs():
    with pytest.raises(ValueError, match="block.conv: grouped / depthwise"):
        channel_structure("block.conv", nn.Conv2d(4, 4, 3, groups=4), [])
    with pytest.raises(ValueError, match="block.conv: expected a torch.nn.Conv2d"):
        channel_structure("block.conv", nn.Linear(3, 3), [])
    with pytest.raises(ValueError, match="padding_mode"):
        channel_structure("block.conv", nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), [])
    with pytest.raises(ValueError, match="string padding"):
        channel_structure("block.conv", nn.Conv2d(3, 3, 3, padding="same"), [])
    consumer = nn.Conv2d(4, 2, 3)
    with pytest.raises(ValueError, match="has 5 channels but its consumer block.conv reads 4"):
        channel_structure("block.conv", consumer, [("block.bn", nn.BatchNorm2d(5))])
    with pytest.raises(ValueError, match="grouped conv"):
        channel_structure("block.conv", consumer, [("block.grouped", nn.Conv2d(4, 4, 1, groups=2))])
    with pytest.raises(ValueError, match="expected Conv2d or BatchNorm2d"):
        channel_structure("block.conv", consumer, [("block.relu", nn.ReLU())])
    conv = nn.Conv2d(3, 2, 3)
    with pytest.raises(ValueError, match="conv: grouped"):
        unfold_inputs(nn.Conv2d(4, 4, 3, groups=4), torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="x: expected shape"):
        unfold_inputs(conv, torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="y: expected a 4-D"):
        conv_output_rows(torch.randn(2, 3, 3))
    accumulator = StatsAccumulator(3 * 9, 2)
    with pytest.raises(ValueError, match="Y: targets must be given"):
        accumulator.add(unfold_inputs(conv, torch.randn(1, 3, 5, 5)))
