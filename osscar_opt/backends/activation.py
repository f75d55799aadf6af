"""``activation``: Wanda-sp style group scores, ``||W_{:,g} * sqrt(diag(X^T X)_g)||_F``.

Each weight column is scaled by its input's calibration norm (from ``diag(X^T X)``, the problem's
``xtx_diag``; without it, ``diag(H) - lam``). The kept weights are re-fit exactly by ``solve``.
"""

from __future__ import annotations

from typing import Any

from osscar_opt.backends._scores import input_energy, top_groups, weighted_group_scores
from osscar_opt.backends.base import Backend, SearchResult, check_options
from osscar_opt.problem import LayerProblem


class ActivationBackend(Backend):
    """Weight norm times input norm per group, then an exact re-fit."""

    name = "activation"
    options = ()

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
        check_options(self.name, options, self.options)
        return SearchResult(top_groups(weighted_group_scores(problem, input_energy(problem)), keep))
