"""Channel surgery shared by the vision adapters (ResNet, MobileNetV2).

A :class:`ChannelUnit` is one prunable set of internal channels: a dense ``Conv2d`` *consumer*
whose input channels are the groups, and the *producers* that make those channels (the previous
conv's output channels, its BatchNorm entries, a depthwise conv and its BatchNorm in between).
Everything between the producers and the consumer must act per channel (BatchNorm, ReLU, ReLU6,
depthwise conv), so that dropping a channel everywhere is exact once the consumer no longer reads it.

Modules are edited in place: parameters and buffers are sliced, the size attributes
(``out_channels``, ``in_channels``, ``groups``, ``num_features``) updated, so the result runs with
stock torch code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ChannelUnit:
    """One prunable channel set, paths relative to the stage module.

    Attributes:
        consumer: path of the dense ``Conv2d`` reading the channels (its input channels are groups).
        producers: paths of the modules that produce the channels, in data order: dense or depthwise
            ``Conv2d`` (lose output channels) and ``BatchNorm2d`` (lose entries).
    """

    consumer: str
    producers: tuple[str, ...]


@dataclass
class Stage:
    """A piece of the network run in sequence during calibration, with its prunable units.

    Attributes:
        name: the stage's path in the model (``"layer1.0"``, ``"features.3"``, ``"stem"``).
        module: a callable module mapping the previous stage's output to this stage's output.
        units: channel units inside the stage, in the order they are pruned.
    """

    name: str
    module: nn.Module
    units: tuple[ChannelUnit, ...] = ()


def is_depthwise(conv: nn.Conv2d) -> bool:
    """True for a depthwise conv (one filter per channel: ``groups == in == out``)."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _parameter(value: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(value.detach().clone().contiguous(), requires_grad=like.requires_grad)


def keep_conv_outputs(conv: nn.Conv2d, channels: torch.Tensor) -> None:
    """Keep only output ``channels`` (int64 indices) of ``conv``; a depthwise conv also shrinks its
    inputs and groups (one filter per channel)."""
    index = channels.to(conv.weight.device)
    depthwise = is_depthwise(conv)
    if conv.groups > 1 and not depthwise:
        raise ValueError(f"conv: grouped producers (groups={conv.groups}) are not supported")
    conv.weight = _parameter(conv.weight[index], conv.weight)
    if conv.bias is not None:
        conv.bias = _parameter(conv.bias[index], conv.bias)
    conv.out_channels = int(index.numel())
    if depthwise:
        conv.in_channels = conv.out_channels
        conv.groups = conv.out_channels


def keep_batchnorm(bn: nn.BatchNorm2d, channels: torch.Tensor) -> None:
    """Keep only the BatchNorm entries ``channels`` (affine parameters and running statistics)."""
    index = channels.to(bn.running_mean.device if bn.running_mean is not None else "cpu")
    if bn.weight is not None:
        bn.weight = _parameter(bn.weight[index.to(bn.weight.device)], bn.weight)
        bn.bias = _parameter(bn.bias[index.to(bn.bias.device)], bn.bias)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[index].clone()
        bn.running_var = bn.running_var[index].clone()
    bn.num_features = int(index.numel())


def set_consumer(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give the consumer its new weight ``(C_out, C_in_kept, kh, kw)`` (and re-fit bias ``(C_out,)``)."""
    expected = (conv.out_channels, *conv.kernel_size)
    if weight.dim() != 4 or (weight.shape[0], *weight.shape[2:]) != expected:
        raise ValueError(
            f"weight: expected ({conv.out_channels}, C_in, {conv.kernel_size[0]}, {conv.kernel_size[1]}), "
            f"got {tuple(weight.shape)}"
        )
    conv.weight = _parameter(weight.to(conv.weight.device, conv.weight.dtype), conv.weight)
    conv.in_channels = int(weight.shape[1])
    if bias is not None:
        like = conv.weight if conv.bias is None else conv.bias
        conv.bias = _parameter(bias.to(like.device, like.dtype), like)


def keep_producers(stage: nn.Module, unit: ChannelUnit, channels: torch.Tensor) -> None:
    """Shrink every producer of ``unit`` (inside ``stage``) to ``channels``."""
    for path in unit.producers:
        module = stage.get_submodule(path)
        if isinstance(module, nn.Conv2d):
            keep_conv_outputs(module, channels)
        elif isinstance(module, nn.BatchNorm2d):
            keep_batchnorm(module, channels)
        else:
            raise ValueError(f"producers: {path} is a {type(module).__name__}, expected Conv2d or BatchNorm2d")


def unit_channels(stage: nn.Module, unit: ChannelUnit) -> int:
    """Number of channels of ``unit`` (input channels of its consumer)."""
    return int(stage.get_submodule(unit.consumer).in_channels)


def check_unit(stage: nn.Module, unit: ChannelUnit) -> None:
    """Check that every producer of ``unit`` yields as many channels as the consumer reads."""
    channels = unit_channels(stage, unit)
    for path in unit.producers:
        module = stage.get_submodule(path)
        size = module.out_channels if isinstance(module, nn.Conv2d) else getattr(module, "num_features", None)
        if size != channels:
            raise ValueError(f"model: {path} has {size} channels but its consumer {unit.consumer} reads {channels}")


def stage_forward(modules: Sequence[nn.Module]) -> nn.Module:
    """A stage module running ``modules`` in order (shares the modules, registers nothing new)."""
    return nn.Sequential(*modules)

