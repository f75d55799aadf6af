"""torchvision ResNet (resnet18/34/50/101): internal channels of every residual block.

BasicBlock: ``conv1 -> bn1 -> relu -> conv2``; the consumer is ``conv2`` and ``conv1`` + ``bn1``
lose the pruned channels. Bottleneck: the same for ``conv1 -> conv2`` and then ``conv2 -> conv3``
(pruned in that order, so ``conv3`` is calibrated on the already pruned ``conv2``). The residual
stream (block outputs, downsample, stem, classifier) is left alone.

The architecture is recognized from module types and the block layout, never from names.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from osscar_opt.adapters.convnet import ChannelUnit, ConvNetAdapter

LAYOUTS: dict[tuple[type, tuple[int, ...]], str] = {
    (BasicBlock, (2, 2, 2, 2)): "resnet18",
    (BasicBlock, (3, 4, 6, 3)): "resnet34",
    (Bottleneck, (3, 4, 6, 3)): "resnet50",
    (Bottleneck, (3, 4, 23, 3)): "resnet101",
}
ARCHITECTURES: tuple[str, ...] = tuple(LAYOUTS.values())
STAGES = ("layer1", "layer2", "layer3", "layer4")


def _layout(model: ResNet) -> tuple[type | None, tuple[int, ...]]:
    blocks = [block for name in STAGES for block in getattr(model, name)]
    kinds = {type(block) for block in blocks}
    kind = kinds.pop() if len(kinds) == 1 else None
    return kind, tuple(len(getattr(model, name)) for name in STAGES)


def block_units(block: nn.Module) -> tuple[ChannelUnit, ...]:
    """The channel units of one residual block, in pruning order."""
    if isinstance(block, Bottleneck):
        return (("conv2", ("conv1", "bn1")), ("conv3", ("conv2", "bn2")))
    if isinstance(block, BasicBlock):
        return (("conv2", ("conv1", "bn1")),)
    raise ValueError(f"model: unexpected ResNet block {type(block).__name__}")


class ResNetAdapter(ConvNetAdapter):
    family = "resnet"
    architectures = ARCHITECTURES

    @classmethod
    def architecture_of(cls, model: nn.Module) -> str | None:
        """The torchvision name (``"resnet18"`` ...) of ``model``, or None when it is not one of them.

        Grouped bottlenecks (ResNeXt) are not supported: their ``conv2`` is not a dense consumer.
        """
        if not isinstance(model, ResNet):
            return None
        kind, layers = _layout(model)
        name = LAYOUTS.get((kind, layers))
        if name is None:
            return None
        if kind is Bottleneck and any(block.conv2.groups != 1 for stage in STAGES for block in getattr(model, stage)):
            return None
        return name

    def stage_units(self) -> list[tuple[str, nn.Module, tuple[ChannelUnit, ...]]]:
        """The stem, then every residual block (the pooling head is not needed)."""
        model = self.model
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)  # shares the modules
        result = [("stem", stem, ())]
        for stage_name in STAGES:
            for index, block in enumerate(getattr(model, stage_name)):
                result.append((f"{stage_name}.{index}", block, block_units(block)))
        return result
