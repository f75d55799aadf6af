"""Prunable structures of a transformer block: which columns and rows one group owns.

A :class:`Structure` ties one *consumer* linear layer (whose input columns are grouped; the
layer problem is built for it) to the *producer* layers whose output rows feed those columns.
Removing group ``g`` removes ``consumer_columns[g]`` from the consumer and ``rows[g]`` from every
producer. Formulations build structures from sizes read off the modules; adapters say which
modules play which role and how to update the module attributes after surgery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Producer:
    """A linear layer whose output rows feed the consumer's input columns.

    Attributes:
        module: the ``nn.Linear`` (weight ``(out, in)``).
        rows: ``rows[g]`` lists the output rows of this layer that belong to group ``g``.
    """

    module: nn.Linear
    rows: list[list[int]]


@dataclass
class Structure:
    """One prunable structure (attention heads, KV groups or MLP neurons) of one block.

    Attributes:
        name: the consumer's qualified name inside the model, e.g. ``"encoder.layer.0.output.dense"``.
        kind: ``"heads"``, ``"kv-groups"`` or ``"neurons"``.
        consumer: the ``nn.Linear`` whose input columns are grouped.
        groups: ``groups[g]`` lists the consumer input columns of group ``g``.
        producers: the layers that lose rows with the groups.
        on_resize: called with the number of kept groups after surgery, to update module
            attributes (number of heads, intermediate size) so stock forward code runs.
    """

    name: str
    kind: str
    consumer: nn.Linear
    groups: list[list[int]]
    producers: list[Producer] = field(default_factory=list)
    on_resize: Callable[[int], None] | None = None

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def keep_count(self, sparsity: float) -> int:
        """Number of groups kept at ``sparsity`` (fraction removed), at least one."""
        return max(1, int(round((1.0 - float(sparsity)) * self.num_groups)))


def contiguous_groups(count: int, size: int, offset: int = 0) -> list[list[int]]:
    """``count`` groups of ``size`` consecutive indices starting at ``offset``."""
    return [list(range(offset + g * size, offset + (g + 1) * size)) for g in range(count)]


def check_linear(module: nn.Module, name: str) -> nn.Linear:
    """Return ``module`` if it is an ``nn.Linear``; otherwise a ValueError naming it."""
    if not isinstance(module, nn.Linear):
        raise ValueError(f"model: expected {name} to be nn.Linear, got {type(module).__name__}")
    return module


def rows_for(groups: Sequence[Sequence[int]], kept: Sequence[int]) -> torch.Tensor:
    """Concatenated indices of the kept groups, in kept order (int64)."""
    index = [i for g in kept for i in groups[g]]
    return torch.tensor(index, dtype=torch.int64)
