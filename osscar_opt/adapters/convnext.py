"""torchvision ConvNeXt (tiny, small, base, large): the hidden units of every block's MLP.

A ConvNeXt block is ``depthwise 7x7 conv -> permute -> LayerNorm -> Linear(dim, 4 dim) -> GELU ->
Linear(4 dim, dim) -> permute``, scaled by a per-channel ``layer_scale`` and added to the residual
stream. Its ``4 dim`` hidden units, channels last, are the structure (kind ``channels``, like every
torchvision unit): one input column of ``block.5`` each, with producer ``block.3``. Everything
else (the depthwise conv and LayerNorm on the residual width, the layer scale, the downsampling
layers, stem and classifier) is never cut: the residual stream keeps its width.

The architecture is recognized from module types and the stage layout (channels and depths),
never from names. Pruned widths reload with ``load_pruned`` (shape records of every Linear); the
stock constructor has no argument for a block's hidden width.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.convnext import CNBlock, ConvNeXt

from osscar_opt.adapters.base import Stage
from osscar_opt.adapters.convnet import ConvNetAdapter
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Structure

LAYOUTS: dict[tuple[tuple[int, ...], tuple[int, ...]], str] = {
    ((96, 192, 384, 768), (3, 3, 9, 3)): "convnext_tiny",
    ((96, 192, 384, 768), (3, 3, 27, 3)): "convnext_small",
    ((128, 256, 512, 1024), (3, 3, 27, 3)): "convnext_base",
    ((192, 384, 768, 1536), (3, 3, 27, 3)): "convnext_large",
}
ARCHITECTURES: tuple[str, ...] = tuple(LAYOUTS.values())
BLOCK_STAGES = (1, 3, 5, 7)
"""Indices of ``features`` that hold CNBlocks (the others: stem and downsampling layers)."""


def _layout(model: ConvNeXt) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    features = model.features
    if len(features) != 8:
        return None
    stages = [features[index] for index in BLOCK_STAGES]
    if not all(isinstance(stage, nn.Sequential) and all(isinstance(b, CNBlock) for b in stage) for stage in stages):
        return None
    widths = tuple(int(stage[0].block[2].normalized_shape[0]) for stage in stages)  # the LayerNorm: never cut
    return widths, tuple(len(stage) for stage in stages)


def block_structure(block: nn.Module, prefix: str) -> Structure:
    """The hidden units of one CNBlock's MLP (kind ``channels``)."""
    body = block.block
    if not (isinstance(body[3], nn.Linear) and isinstance(body[5], nn.Linear)):
        raise ValueError(f"model: {prefix} is not a ConvNeXt block (Linear, GELU, Linear at block.3-5)")
    structure = neuron_structure(f"{prefix}.block.5", [body[3]], body[5])
    structure.kind = "channels"
    return structure


class ConvNeXtAdapter(ConvNetAdapter):
    family = "convnext"
    architectures = ARCHITECTURES

    @classmethod
    def architecture_of(cls, model: nn.Module) -> str | None:
        if not isinstance(model, ConvNeXt):
            return None
        layout = _layout(model)
        return None if layout is None else LAYOUTS.get(layout)

    def stages(self) -> list[Stage]:
        """The stem, every block, every downsampling layer, in forward order (the head is not needed)."""
        stages = []
        for index, feature in enumerate(self.model.features):
            if index not in BLOCK_STAGES:
                stages.append(Stage(f"features.{index}", feature))
                continue
            for position, block in enumerate(feature):
                name = f"features.{index}.{position}"
                stages.append(Stage(name, block, lambda module, name=name: [block_structure(module, name)]))
        return stages
