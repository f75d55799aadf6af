"""Unfold-based conv statistics against the direct convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from osscar_opt.formulations.conv import (
    ConvStatistics,
    channel_groups,
    conv_weight,
    output_rows,
    unfold_inputs,
    weight_matrix,
)

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


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_unfold_times_weight_is_the_convolution(shape):
    conv = make_conv(0, **shape)
    x = torch.randn(3, conv.in_channels, 9, 8, dtype=torch.float64)
    rows = unfold_inputs(conv, x) @ weight_matrix(conv).T
    if conv.bias is not None:
        rows = rows + conv.bias.detach()
    assert torch.allclose(rows, output_rows(conv(x)), atol=1e-12)
    assert channel_groups(conv).tolist()[: 2 * conv.kernel_size[0] * conv.kernel_size[1]] == [0] * (
        conv.kernel_size[0] * conv.kernel_size[1]
    ) + [1] * (conv.kernel_size[0] * conv.kernel_size[1])


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_problem_loss_equals_direct_conv_residual(shape):
    """loss(S) = ||Y - conv_S(x)||^2 + lam ||W - What||^2 with conv_S the pruned conv built from
    the solution's weights, Y the output of a different (dense) conv on other inputs."""
    conv = make_conv(1, **shape)
    dense = make_conv(2, **shape)
    x_batches = [torch.randn(2, 5, 9, 8, dtype=torch.float64) for _ in range(3)]
    x_dense = [x + 0.1 * torch.randn_like(x) for x in x_batches]
    stats = ConvStatistics(conv, targets=True)
    for x, xd in zip(x_batches, x_dense, strict=True):
        stats.add(x, dense(xd))
    problem = stats.problem(damp=1e-2)
    support = (0, 2, 3)
    kept = torch.tensor(support)
    weights = problem.weights(support)
    pruned = nn.Conv2d(len(support), conv.out_channels, **{**shape, "bias": conv.bias is not None}).double()
    pruned.weight.data = conv_weight(weights, conv, kept)
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
    x = torch.randn(6, 5, 7, 7, dtype=torch.float64)
    one, many = ConvStatistics(conv, targets=False), ConvStatistics(conv, targets=False)
    one.add(x)
    for part in x.split(2):
        many.add(part)
    assert one.rows == many.rows == 6 * 4 * 4
    a, b = one.problem(), many.problem()
    assert torch.allclose(a.H, b.H) and torch.allclose(a.G, b.G)


def test_keep_all_recovers_the_weight():
    conv = make_conv(4, kernel_size=3, padding=1, bias=True)
    stats = ConvStatistics(conv, targets=True)
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    stats.add(x, conv(x))
    problem = stats.problem(refit_bias=True)
    everything = range(problem.num_groups)
    assert torch.allclose(problem.weights(everything), weight_matrix(conv), atol=1e-8)
    assert torch.allclose(problem.bias(everything), conv.bias.detach(), atol=1e-8)


def test_bad_consumers_and_inputs():
    with pytest.raises(ValueError, match="conv"):
        ConvStatistics(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="conv"):
        ConvStatistics(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="padding_mode"):
        ConvStatistics(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    stats = ConvStatistics(nn.Conv2d(3, 2, 3), targets=True)
    with pytest.raises(ValueError, match="x"):
        stats.add(torch.randn(1, 4, 5, 5), torch.randn(1, 2, 3, 3))
    with pytest.raises(ValueError, match="y"):
        stats.add(torch.randn(1, 3, 5, 5))
