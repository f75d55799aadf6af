"""torchvision MobileNetV2: hidden channels of every expanding inverted residual.

An expanding block is ``expand 1x1 conv + BN + ReLU6 -> depthwise 3x3 conv + BN + ReLU6 ->
projection 1x1 conv + BN``. The hidden channels are the groups of the projection conv (the
consumer, one column per channel); the expand conv and its BN lose output channels, and the
depthwise conv and its BN are coupled producers that lose the same channels (its ``groups``
shrink with them). Blocks without expansion (``expand_ratio == 1``) read the residual stream
directly and are left alone, as are the stem, the last 1x1 conv and the classifier.

The architecture is recognized from module types and structure, never from names. Pruned
widths are stated to the stock class by one ``inverted_residual_setting`` row per block, with the
expand ratio ``hidden / input channels`` (:meth:`MobileNetV2Adapter.stock_constructor`).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2

from osscar_opt.adapters.convnet import ChannelUnit, ConvNetAdapter
from osscar_opt.formulations.layers import is_depthwise

ARCHITECTURES: tuple[str, ...] = ("mobilenet_v2",)


def _conv_bn(module: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
    """``(conv, bn)`` of a Conv2dNormActivation-like Sequential, else None."""
    if not isinstance(module, nn.Sequential) or len(module) < 2:
        return None
    conv, bn = module[0], module[1]
    if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
        return conv, bn
    return None


def block_units(block: InvertedResidual) -> tuple[ChannelUnit, ...]:
    """The hidden-channel unit of an expanding inverted residual; ``()`` for a non-expanding one."""
    body = block.conv
    if len(body) != 4:
        return ()
    expand, depthwise = _conv_bn(body[0]), _conv_bn(body[1])
    projection = body[2]
    if expand is None or depthwise is None or not isinstance(projection, nn.Conv2d):
        raise ValueError("model: unexpected InvertedResidual layout (expected expand, depthwise, projection)")
    middle = depthwise[0]
    # A block pruned to one hidden channel has a 1-channel depthwise conv (groups == 1).
    one_channel = isinstance(middle, nn.Conv2d) and middle.groups == middle.in_channels == middle.out_channels == 1
    if expand[0].groups != 1 or not (is_depthwise(middle) or one_channel) or projection.groups != 1:
        raise ValueError("model: unexpected InvertedResidual convs (expand and projection dense, middle depthwise)")
    return (("conv.2", ("conv.0.0", "conv.0.1", "conv.1.0", "conv.1.1")),)


class MobileNetV2Adapter(ConvNetAdapter):
    family = "mobilenet"
    architectures = ARCHITECTURES

    @classmethod
    def architecture_of(cls, model: nn.Module) -> str | None:
        """``"mobilenet_v2"`` for a torchvision MobileNetV2 (any width), else None."""
        if not isinstance(model, MobileNetV2):
            return None
        if not any(isinstance(module, InvertedResidual) for module in model.features):
            return None
        return "mobilenet_v2"

    def stage_units(self) -> list[tuple[str, nn.Module, tuple[ChannelUnit, ...]]]:
        """``features[i]`` up to the last inverted residual."""
        features = self.model.features
        last = max(i for i, module in enumerate(features) if isinstance(module, InvertedResidual))
        result = []
        for index in range(last + 1):
            module = features[index]
            units = block_units(module) if isinstance(module, InvertedResidual) else ()
            result.append((f"features.{index}", module, units))
        return result

    def stock_constructor(self) -> tuple[str, dict[str, Any]] | None:
        """``MobileNetV2(width_mult=w, inverted_residual_setting=[[hidden / in, out / w, 1, stride], ...],
        round_nearest=1)`` rebuilds every block's width (``w`` from the stem's 32 channels); None when
        a pruned block's hidden width equals its input width (ratio 1 would drop the expand conv) or
        a width does not round back exactly."""
        features = self.model.features
        stem, head = features[0][0], features[-1][0]
        if not (isinstance(stem, nn.Conv2d) and isinstance(head, nn.Conv2d)):
            return None
        width = stem.out_channels / 32
        if _rounded(1280 * max(1.0, width)) != head.out_channels:
            return None
        setting = []
        for block in features:
            if not isinstance(block, InvertedResidual):
                continue
            convs = [module for module in block.conv.modules() if isinstance(module, nn.Conv2d)]
            inputs, outputs = convs[0].in_channels, convs[-1].out_channels
            ratio = 1.0 if len(convs) == 2 else convs[0].out_channels / inputs
            if (len(convs) == 3 and ratio == 1.0) or _rounded(outputs / width * width) != outputs:
                return None
            if len(convs) == 3 and _rounded(inputs * ratio) != convs[1].out_channels:
                return None  # the expand conv's width must round back from the ratio
            setting.append([ratio, outputs / width, 1, max(max(conv.stride) for conv in convs)])
        classifier = self.model.classifier
        dropout = next((float(m.p) for m in classifier if isinstance(m, nn.Dropout)), 0.0)
        linear = next(m for m in classifier if isinstance(m, nn.Linear))
        kwargs = {"num_classes": linear.out_features, "width_mult": width, "inverted_residual_setting": setting,
                  "round_nearest": 1, "dropout": dropout}
        return "MobileNetV2", kwargs


def _rounded(value: float) -> int:
    """torchvision's ``_make_divisible(value, 1)``."""
    return max(1, int(value + 0.5))
