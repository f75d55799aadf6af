"""Consumer layers read as matrices: how a layer's inputs become the rows of the layer problem.

Every consumer computes ``y = W x + b`` per row with ``W`` of shape ``(m, p)``:

* ``nn.Linear``: weight ``(out, in)``; rows are tokens (leading dimensions flattened);
* transformers' ``Conv1D`` (GPT-2): weight stored ``(in, out)``, read transposed;
* dense ``nn.Conv2d`` (``groups == 1``, zero padding): rows are (image, output position) pairs,
  columns the receptive-field patch, channel-major (``c * kh * kw + i * kw + j``) as
  ``torch.nn.functional.unfold`` lays it out and ``weight.reshape(C_out, -1)`` reads it.

Input channel ``c`` of a conv consumer owns the ``kh * kw`` columns ``c*kh*kw .. (c+1)*kh*kw - 1``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class (GPT-2 family), or None when transformers is absent."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' transposed linear layer ``Conv1D`` (weight ``(in, out)``)."""
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_depthwise(conv: nn.Module) -> bool:
    """True for a depthwise conv (one filter per channel: ``groups == in == out``)."""
    return (
        isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    )


def check_linear(module: nn.Module, name: str) -> nn.Module:
    """Return ``module`` if it is an ``nn.Linear`` or ``Conv1D``; otherwise a ValueError naming it."""
    if not is_linear(module):
        raise ValueError(f"model: expected {name} to be nn.Linear or Conv1D, got {type(module).__name__}")
    return module


def check_conv_consumer(conv: nn.Module, name: str = "conv") -> nn.Conv2d:
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
    """``kh * kw``: the number of columns of one input channel."""
    return int(conv.kernel_size[0]) * int(conv.kernel_size[1])


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(m, p)``: outputs and input columns of a consumer (Linear, Conv1D or dense Conv2d)."""
    if is_conv1d(module):
        return int(module.nf), int(module.nx)
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels), int(module.in_channels) * kernel_area(module)
    return int(module.out_features), int(module.in_features)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The consumer weight as ``(m, p)``, detached (a transposed view for ``Conv1D``)."""
    weight = module.weight.detach()
    if is_conv1d(module):
        return weight.t()
    if isinstance(module, nn.Conv2d):
        return weight.reshape(weight.shape[0], -1)
    return weight


def unfold_inputs(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patch matrix ``(N * H_out * W_out, C_in * kh * kw)`` of a conv input ``x`` ``(N, C_in, H, W)``.

    One row per output position (image-major, then row-major over the output grid), columns
    channel-major like ``weight.reshape(C_out, -1)``.
    """
    check_conv_consumer(conv)
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"x: expected shape (N, {conv.in_channels}, H, W), got {tuple(x.shape)}")
    patches = F.unfold(
        x, kernel_size=conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    )  # (N, C_in*kh*kw, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def conv_output_rows(y: torch.Tensor) -> torch.Tensor:
    """Conv output ``(N, C_out, H_out, W_out)`` as rows ``(N * H_out * W_out, C_out)`` (the order of
    :func:`unfold_inputs`)."""
    if y.dim() != 4:
        raise ValueError(f"y: expected a 4-D conv output (N, C_out, H_out, W_out), got {tuple(y.shape)}")
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The consumer's input ``x`` as problem rows ``(n, p)``."""
    if isinstance(module, nn.Conv2d):
        return unfold_inputs(module, x)
    return x.reshape(-1, x.shape[-1])


def output_rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The consumer's output ``y`` as target rows ``(n, m)``, in the order of :func:`input_rows`."""
    if isinstance(module, nn.Conv2d):
        return conv_output_rows(y)
    return y.reshape(-1, y.shape[-1])
