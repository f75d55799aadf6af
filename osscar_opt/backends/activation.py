"""``activation``: Wanda-sp style group scores, ``||W_{:,g} * sqrt(diag(X^T X)_g)||_F``.

Each weight column is scaled by its input's calibration norm (from ``diag(X^T X)``, the problem's
``xtx_diag``; without it, ``diag(H) - lam``). The kept weights are re-fit exactly by ``solve``.
"""

from __future__ import annotations

from typing import Any

import torch

from osscar_opt.backends._scores import group_sums, top_groups
from osscar_opt.backends.base import Backend, SearchResult, check_options
from osscar_opt.problem import LayerProblem


class ActivationBackend(Backend):
    """Weight norm times input norm per group, then an exact re-fit."""

    name = "activation"

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
        check_options(self.name, options, ())
        weight = problem.reference_weight().to(torch.float64).cpu()
        p_in = problem.num_inputs
        if problem.xtx_diag is not None:
            energy = problem.xtx_diag[:p_in].to(torch.float64).cpu()
        else:
            energy = (torch.diagonal(problem.H)[:p_in].to(torch.float64).cpu() - problem.lam).clamp_min(0)
        column_scores = weight.square().sum(0) * energy
        return SearchResult(top_groups(group_sums(problem, column_scores), keep))
