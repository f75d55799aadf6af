"""``fluctuation``: FLAP's fluctuation metric (An et al., AAAI 2024, "WIFV"), ``sum_g Var(x_j) ||W_{:,j}||^2``.

FLAP scores each input column ``j`` of a consumer by the sample variance of that input over the
calibration rows times the squared norm of the weight column it feeds, sums the scores over a
group (a head's columns, a neuron's column) and removes the lowest. Where Wanda-sp
(``activation``) weighs a column by its energy ``E[x_j^2]``, FLAP weighs it by its *fluctuation*
``E[x_j^2] - E[x_j]^2``: an input that is large but constant is cheap to remove, because its
mean contribution ``W_{:,j} E[x_j]`` can be moved into the bias.

What this backend does: FLAP's selection per layer, at the budget it is given (FLAP's uniform
per-layer variant; FLAP's adaptive search standardizes the scores and allocates widths across
layers, which is not done here). The kept weights are then re-fit exactly by ``solve`` like every
backend's. FLAP's own compensation keeps the weights and adds ``W_{:,removed} E[x_removed]`` to
the bias; with ``refit_bias`` the exact re-fit (kept weights and bias) dominates that compensation
on the calibration rows; on bias-free layers (LLaMA) neither FLAP's bias nor ours is written.

Needs the problem's ``input_var`` (set by ``LayerProblem.from_moments`` / the pipeline); problems
saved before that field existed fall back to ``diag(X^T X)`` (the energy) and say so in ``info``.
"""

from __future__ import annotations

from typing import Any

from osscar_opt.backends._scores import input_energy, top_groups, weighted_group_scores
from osscar_opt.backends.base import Backend, SearchResult, check_options
from osscar_opt.problem import LayerProblem


class FluctuationBackend(Backend):
    """Input variance times squared weight-column norm per group (FLAP), then an exact re-fit."""

    name = "fluctuation"
    options = ()

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
        check_options(self.name, options, self.options)
        if problem.input_var is not None:
            spread, source = problem.input_var, "input_var"
        else:
            spread, source = input_energy(problem), "input energy (no input_var)"
        support = top_groups(weighted_group_scores(problem, spread), keep)
        return SearchResult(support, info={"spread": source})
