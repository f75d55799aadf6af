"""Prunable structures: which consumer columns and which producer rows one group owns.

A :class:`Structure` ties one *consumer* layer (whose input columns are grouped; the layer
problem is built for it) to the *producers* whose outputs feed those columns. Removing group ``g``
removes ``groups[g]`` (consumer input columns) from the consumer and ``rows[g]`` (output rows,
channels or entries) from every producer. One type serves every family:

* attention heads / GQA key-value groups: consumer the output projection, producers q, k, v;
* MLP neurons: consumer the down projection, producers the up (and gate) projections;
* conv channels: consumer a dense ``Conv2d`` (one group = one input channel's ``kh*kw`` columns),
  producers the previous convs (dense or depthwise) and BatchNorms.

Everything between the producers and the consumer must act per group (activations, BatchNorm,
depthwise conv, attention within a head), so that dropping a group everywhere is exact once the
consumer no longer reads it. Builders live in ``attention.py``, ``mlp.py`` and ``conv.py``;
:mod:`~osscar_opt.formulations.layers` reads the layers as matrices and
:mod:`~osscar_opt.formulations.surgery` cuts them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from osscar_opt.formulations.layers import input_rows, matrix_shape, output_rows, weight_matrix


@dataclass
class Producer:
    """A layer whose outputs feed the consumer's grouped input columns.

    Attributes:
        module: ``nn.Linear``, ``Conv1D``, ``nn.Conv2d`` (dense or depthwise) or ``nn.BatchNorm2d``.
        rows: ``rows[g]`` lists the output rows (channels, BatchNorm entries) of group ``g``.
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
    """One prunable structure of one stage.

    Attributes:
        name: the consumer's qualified name inside the model, e.g. ``"encoder.layer.0.output.dense"``.
        kind: ``"heads"``, ``"kv_groups"``, ``"neurons"`` or ``"channels"`` (see ``osscar_opt.budget.KINDS``).
        consumer: the layer whose input columns are grouped (Linear, Conv1D or dense Conv2d).
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
        """Consumer input columns ``p`` (the columns that are grouped)."""
        return matrix_shape(self.consumer)[1]

    @property
    def out_features(self) -> int:
        """Consumer outputs ``m``."""
        return matrix_shape(self.consumer)[0]

    def weight(self) -> torch.Tensor:
        """The consumer weight as ``(m, p)``, detached."""
        return weight_matrix(self.consumer)

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The consumer's input activation as problem rows ``(n, p)``."""
        return input_rows(self.consumer, x)

    def output_rows(self, y: torch.Tensor) -> torch.Tensor:
        """The consumer's output activation as target rows ``(n, m)``."""
        return output_rows(self.consumer, y)


def contiguous_groups(count: int, size: int, offset: int = 0) -> list[list[int]]:
    """``count`` groups of ``size`` consecutive indices starting at ``offset``."""
    return [list(range(offset + g * size, offset + (g + 1) * size)) for g in range(count)]


def rows_for(groups: Sequence[Sequence[int]], kept: Sequence[int]) -> torch.Tensor:
    """Concatenated indices of the kept groups, in kept order (int64)."""
    index = [i for g in kept for i in groups[g]]
    return torch.tensor(index, dtype=torch.int64)
