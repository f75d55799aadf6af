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
        layout: for a fused projection whose segments differ in size (Phi-3's ``qkv_proj`` with
            GQA: ``r`` query heads but one key and one value head per group), ``layout[s][g]``
            lists the rows of group ``g`` in segment ``s``; the kept rows are laid out segment by
            segment. ``rows`` is then the union of each group's segments.
        tail: rows of no group, always kept, after the kept groups' rows (Phi-3's key and value
            rows when its query heads are pruned inside the KV groups).
    """

    module: nn.Module
    rows: list[list[int]]
    segments: int = 1
    layout: list[list[list[int]]] | None = None
    tail: list[int] = field(default_factory=list)

    def kept_rows(self, kept: Sequence[int]) -> torch.Tensor:
        """Output rows of the kept groups in the layout the module expects (int64)."""
        if self.layout is not None:
            return torch.tensor([i for segment in self.layout for g in kept for i in segment[g]], dtype=torch.int64)
        if self.tail:
            return torch.cat([rows_for(self.rows, kept), torch.tensor(self.tail, dtype=torch.int64)])
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
        blocks: the groups fall into this many equal consecutive blocks that must keep the same
            number of groups each (``q_heads``: the query heads of each KV group, since the stock
            forward repeats every key-value head for the same number of query heads). A budget
            counts groups per block (:attr:`budget_groups`); 1 for every other kind.
        on_empty: called, instead of cutting, when no group is kept: replaces the whole sublayer
            by one whose output is the given bias (or zero), :mod:`~osscar_opt.formulations.empty`;
            None where the family's forward code cannot drop the sublayer (a keep of 0 is refused).
    """

    name: str
    kind: str
    consumer: nn.Module
    groups: list[list[int]]
    producers: list[Producer] = field(default_factory=list)
    on_resize: Callable[[int], None] | None = None
    blocks: int = 1
    on_empty: Callable[[torch.Tensor | None], None] | None = None

    @property
    def can_empty(self) -> bool:
        """True when the structure may keep no group (its sublayer is then removed)."""
        return self.on_empty is not None

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def budget_groups(self) -> int:
        """The groups a budget counts: all of them, or those of one block (``q_heads``: query heads per KV group)."""
        return self.num_groups // self.blocks

    def first_groups(self, count: int) -> list[int]:
        """The first ``count`` groups of every block (``count`` as a budget counts): a valid support
        of ``count * blocks`` groups, used to cut copies for cost tables and to resize before reloading."""
        per_block = self.budget_groups
        return [block * per_block + g for block in range(self.blocks) for g in range(count)]

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
