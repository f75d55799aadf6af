"""Prunable structures of a transformer block: which columns and rows one group owns.

A :class:`Structure` ties one *consumer* linear layer (whose input columns are grouped; the
layer problem is built for it) to the *producer* layers whose output rows feed those columns.
Removing group ``g`` removes ``consumer_columns[g]`` from the consumer and ``rows[g]`` from every
producer. Formulations build structures from sizes read off the modules; adapters say which
modules play which role and how to update the module attributes after surgery.

Linear layers are ``nn.Linear`` (weight ``(out, in)``) or transformers' ``Conv1D`` (GPT-2;
weight ``(in, out)``); :func:`linear_weight` and :func:`linear_shape` read both as ``(out, in)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
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


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear`` or ``Conv1D``."""
    if is_conv1d(module):
        return int(module.nf), int(module.nx)
    return int(module.out_features), int(module.in_features)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)`` (a transposed view for ``Conv1D``), detached."""
    weight = module.weight.detach()
    return weight.t() if is_conv1d(module) else weight


@dataclass
class Producer:
    """A linear layer whose output rows feed the consumer's input columns.

    Attributes:
        module: the ``nn.Linear`` or ``Conv1D``.
        rows: ``rows[g]`` lists the output rows of this layer that belong to group ``g``.
        segments: for a fused projection (GPT-2's ``c_attn`` = query | key | value), the number
            of equal segments of ``rows[g]``; the kept rows are laid out segment by segment
            (all kept query rows, then all kept key rows, ...), as the module splits them.
    """

    module: nn.Module
    rows: list[list[int]]
    segments: int = 1

    def kept_rows(self, kept: Sequence[int]) -> torch.Tensor:
        """Output rows of the kept groups in the layout the module expects (int64)."""
        if self.segments == 1:
            return rows_for(self.rows, kept)
        index = []
        for segment in range(self.segments):
            for g in kept:
                size = len(self.rows[g]) // self.segments
                index.extend(self.rows[g][segment * size:(segment + 1) * size])
        return torch.tensor(index, dtype=torch.int64)


@dataclass
class Structure:
    """One prunable structure (attention heads, KV groups or MLP neurons) of one block.

    Attributes:
        name: the consumer's qualified name inside the model, e.g. ``"encoder.layer.0.output.dense"``.
        kind: ``"heads"``, ``"kv-groups"`` or ``"neurons"``.
        consumer: the ``nn.Linear`` (or ``Conv1D``) whose input columns are grouped.
        groups: ``groups[g]`` lists the consumer input columns of group ``g``.
        producers: the layers that lose rows with the groups.
        on_resize: called with the number of kept groups after surgery, to update module
            attributes (number of heads, intermediate size) so stock forward code runs.
    """

    name: str
    kind: str
    consumer: nn.Module
    groups: list[list[int]]
    producers: list[Producer] = field(default_factory=list)
    on_resize: Callable[[int], None] | None = None

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def in_features(self) -> int:
        """Consumer inputs ``p`` (the columns that are grouped)."""
        return linear_shape(self.consumer)[1]

    @property
    def out_features(self) -> int:
        """Consumer outputs ``m``."""
        return linear_shape(self.consumer)[0]

    def weight(self) -> torch.Tensor:
        """The consumer weight as ``(m, p)`` = ``(out, in)``, detached."""
        return linear_weight(self.consumer)

    def keep_count(self, sparsity: float) -> int:
        """Number of groups kept at ``sparsity`` (fraction removed), at least one."""
        return max(1, int(round((1.0 - float(sparsity)) * self.num_groups)))


def contiguous_groups(count: int, size: int, offset: int = 0) -> list[list[int]]:
    """``count`` groups of ``size`` consecutive indices starting at ``offset``."""
    return [list(range(offset + g * size, offset + (g + 1) * size)) for g in range(count)]


def check_linear(module: nn.Module, name: str) -> nn.Module:
    """Return ``module`` if it is an ``nn.Linear`` or ``Conv1D``; otherwise a ValueError naming it."""
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise ValueError(f"model: expected {name} to be nn.Linear or Conv1D, got {type(module).__name__}")
    return module


def rows_for(groups: Sequence[Sequence[int]], kept: Sequence[int]) -> torch.Tensor:
    """Concatenated indices of the kept groups, in kept order (int64)."""
    index = [i for g in kept for i in groups[g]]
    return torch.tensor(index, dtype=torch.int64)
