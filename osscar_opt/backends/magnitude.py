"""``magnitude``: keep the groups with the largest Frobenius norm of their weight columns.

The kept weights are then re-fit exactly by ``osscar_opt.solve`` (least squares on the support).
Without a stored original weight, the unpruned least-squares weight ``H^{-1} G`` is used.
"""

from __future__ import annotations

from typing import Any

import torch

from osscar_opt.backends._scores import group_sums, top_groups
from osscar_opt.backends.base import Backend, SearchResult, check_options
from osscar_opt.problem import LayerProblem


class MagnitudeBackend(Backend):
    """Group-norm magnitude baseline followed by an exact re-fit."""

    name = "magnitude"
    options = ()

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
        check_options(self.name, options, self.options)
        weight = problem.reference_weight().to(torch.float64)
        column_energy = weight.square().sum(0)
        return SearchResult(top_groups(group_sums(problem, column_energy), keep))
