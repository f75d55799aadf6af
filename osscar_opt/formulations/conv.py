"""Conv2d consumer formulation: unfolded patches, one input channel = one group of ``kh*kw`` columns.

A ``Conv2d`` with ``groups == 1`` computes, at every output position, ``y = W x + b`` where ``x`` is
the receptive-field patch (``C_in * kh * kw`` values, zero padding included) and ``W`` is
``weight.reshape(C_out, -1)``. ``torch.nn.functional.unfold`` lays a patch out channel-major
(column ``c * kh * kw + i * kw + j``), exactly as the weight reshape does, so the layer problem of
DESIGN.md applies with one row per (image, output position) and one group per input channel.

Removing input channel ``c`` of the consumer is what lets the producing conv drop output channel
``c`` (and its BatchNorm entry). Grouped / depthwise convs are not consumers here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from osscar_opt.problem import LayerProblem
from osscar_opt.statistics import StatsAccumulator


def check_consumer(conv: nn.Module, name: str = "conv") -> nn.Conv2d:
    """Validate that ``conv`` is a dense (``groups == 1``) zero-padded ``nn.Conv2d``."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{name}: expected a torch.nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"{name}: grouped / depthwise convs (groups={conv.groups}) are not consumers")
    if conv.padding_mode != "zeros":
        raise ValueError(f"{name}: only zero padding is supported, got padding_mode={conv.padding_mode!r}")
    if isinstance(conv.padding, str):
        raise ValueError(f"{name}: string padding {conv.padding!r} is not supported; give explicit sizes")
    return conv


def kernel_area(conv: nn.Conv2d) -> int:
    """``kh * kw``: the number of columns of one input channel's group."""
    return int(conv.kernel_size[0]) * int(conv.kernel_size[1])


def unfold_inputs(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patch matrix of the conv's input.

    Args:
        conv: the consumer (``groups == 1``).
        x: input activations ``(N, C_in, H, W)``.

    Returns:
        ``(N * H_out * W_out, C_in * kh * kw)``: one row per output position (image-major, then
        row-major over the output grid), columns channel-major like ``weight.reshape(C_out, -1)``.
    """
    check_consumer(conv)
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"x: expected shape (N, {conv.in_channels}, H, W), got {tuple(x.shape)}")
    patches = F.unfold(
        x, kernel_size=conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    )  # (N, C_in*kh*kw, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def output_rows(y: torch.Tensor) -> torch.Tensor:
    """Conv output ``(N, C_out, H_out, W_out)`` as rows ``(N * H_out * W_out, C_out)``.

    The row order matches :func:`unfold_inputs`.
    """
    if y.dim() != 4:
        raise ValueError(f"y: expected a 4-D conv output (N, C_out, H_out, W_out), got {tuple(y.shape)}")
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def channel_groups(conv: nn.Conv2d) -> torch.Tensor:
    """``group_of_column`` (``C_in * kh * kw``,) int64: column ``c*kh*kw + t`` belongs to channel ``c``."""
    return torch.arange(conv.in_channels, dtype=torch.int64).repeat_interleave(kernel_area(conv))


def weight_matrix(conv: nn.Conv2d) -> torch.Tensor:
    """The conv weight as the layer matrix ``(C_out, C_in * kh * kw)``, float64, detached."""
    return conv.weight.detach().reshape(conv.out_channels, -1).to(torch.float64)


def conv_weight(matrix: torch.Tensor, conv: nn.Conv2d, channels: torch.Tensor | None = None) -> torch.Tensor:
    """Reshape a layer matrix ``(C_out, C_in*kh*kw)`` back to a conv weight, keeping input ``channels``.

    Returns ``(C_out, len(channels), kh, kw)`` in the conv's dtype and device.
    """
    kh, kw = conv.kernel_size
    weight = matrix.reshape(matrix.shape[0], conv.in_channels, kh, kw)
    if channels is not None:
        weight = weight[:, channels.to(weight.device)]
    return weight.to(device=conv.weight.device, dtype=conv.weight.dtype).contiguous()


class ConvStatistics:
    """Streaming statistics of one Conv2d consumer (``H``, ``G``, ``c0`` over patch rows).

    Args:
        conv: the consumer conv (``groups == 1``).
        targets: True when dense targets are fed with every batch (sequential calibration:
            inputs from the pruned network, targets from the dense one); False for ``Y = X W^T``.
        device: where the float64 accumulators live (default: the conv's device).
    """

    def __init__(self, conv: nn.Conv2d, *, targets: bool = True, device=None) -> None:
        self.conv = check_consumer(conv)
        self.targets = bool(targets)
        self.accumulator = StatsAccumulator(
            conv.in_channels * kernel_area(conv),
            num_outputs=conv.out_channels if targets else None,
            device=device if device is not None else conv.weight.device,
        )

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add a batch: inputs ``x`` ``(N, C_in, H, W)`` and, with targets, the dense conv output
        ``y`` ``(N, C_out, H_out, W_out)`` (bias included when the conv has one)."""
        X = unfold_inputs(self.conv, x.detach())
        Y = None
        if self.targets:
            if y is None:
                raise ValueError("y: dense targets are required (ConvStatistics was built with targets=True)")
            Y = output_rows(y.detach())
        self.accumulator.add(X, Y)

    @property
    def rows(self) -> int:
        """Patch rows accumulated so far."""
        return self.accumulator.rows

    def problem(
        self, *, damp: float = 1e-2, refit_bias: bool = False, meta: Mapping[str, str] | None = None
    ) -> LayerProblem:
        """The layer problem for the conv's current weight; ``refit_bias`` adds a bias column."""
        bias = None if self.conv.bias is None else self.conv.bias.detach()
        info = {"kind": "conv-channels", "kernel": f"{self.conv.kernel_size[0]}x{self.conv.kernel_size[1]}"}
        info.update(meta or {})
        return self.accumulator.problem(
            weight_matrix(self.conv), channel_groups(self.conv), damp=damp, bias=bias,
            refit_bias=refit_bias, meta=info,
        )
