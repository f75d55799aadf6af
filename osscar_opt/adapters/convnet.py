"""What the torchvision families share: images in, residual blocks as stages, channel units.

A family subclass of :class:`ConvNetAdapter` recognizes its architecture from module types and
layout (never from names), lists its stages (the stem and blocks with nothing to prune are stages
with no structures) and, per stage, its channel units: ``(consumer path, producer paths)``
relative to the stage module. The residual stream is never pruned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from osscar_opt.adapters.base import ModelAdapter, Stage, StageCall, check_batch_size, model_device
from osscar_opt.formulations.conv import channel_structure
from osscar_opt.formulations.structures import Structure

ChannelUnit = tuple[str, tuple[str, ...]]
"""``(consumer path, producer paths)`` inside a stage module, producers in data order."""


class ConvNetAdapter(ModelAdapter):
    """Base of the torchvision families. Subclasses set ``architectures`` and implement
    :meth:`architecture_of` and :meth:`stage_units`."""

    architectures: ClassVar[tuple[str, ...]] = ()
    adds_bias = True
    default_target = "dense-output"  # pruned-input: MobileNetV2 on digits 87.8% -> 62.9% at 30% channels

    @classmethod
    def architecture_of(cls, model: nn.Module) -> str | None:
        """The torchvision name of ``model`` (``"resnet18"`` ...), or None when not of this family."""
        raise NotImplementedError

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return cls.architecture_of(model) is not None

    @property
    def architecture(self) -> str:
        return str(self.architecture_of(self.model))

    def stage_units(self) -> list[tuple[str, nn.Module, tuple[ChannelUnit, ...]]]:
        """``(name, module, units)`` of every stage, in forward order."""
        raise NotImplementedError

    def stages(self) -> list[Stage]:
        return [Stage(name, module, _units_structures(name, units)) for name, module, units in self.stage_units()]

    def stock_constructor(self) -> tuple[str, dict[str, Any]] | None:
        """``(torchvision class name, keyword arguments)`` under which the stock class builds the
        model with its current (pruned) widths, or None when its arguments cannot state them."""
        return None

    def internal_channels(self) -> dict[str, int]:
        """Channels of every prunable unit: ``{"layer1.0.conv2": 64, ...}``."""
        return {structure.name: structure.num_groups for structure in self.structures()}

    def calibration_batches(self, calibration: Any, batch_size: int) -> list[torch.Tensor]:
        """Float images ``(N, C, H, W)`` (or an iterable of such batches), on the model's device."""
        if isinstance(calibration, torch.Tensor):
            batches = list(calibration.split(check_batch_size(batch_size)))
        else:
            try:
                batches = [torch.as_tensor(batch) for batch in _iterable(calibration)]
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError("calibration: expected a tensor (N, C, H, W) of images or batches of them") from exc
        if not batches:
            raise ValueError("calibration: no images given")
        for batch in batches:
            if batch.dim() != 4 or not batch.is_floating_point() or batch.shape[0] == 0:
                raise ValueError(
                    f"calibration: expected float image batches of shape (N, C, H, W), got {tuple(batch.shape)} "
                    f"{batch.dtype}"
                )
            if not torch.isfinite(batch).all():
                raise ValueError("calibration: contains NaN or Inf values")
        device = model_device(self.model)
        return [batch.to(device) for batch in batches]

    def stage_inputs(self, batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[StageCall]]:
        return list(batches), [StageCall() for _ in batches]


def _iterable(value: Any) -> Iterable:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(type(value).__name__)
    return value


def _units_structures(stage_name: str, units: Sequence[ChannelUnit]):
    def structures(module: nn.Module) -> list[Structure]:
        result = []
        for consumer, producers in units:
            result.append(channel_structure(
                f"{stage_name}.{consumer}", module.get_submodule(consumer),
                [(f"{stage_name}.{path}", module.get_submodule(path)) for path in producers],
            ))
        return result

    return structures
