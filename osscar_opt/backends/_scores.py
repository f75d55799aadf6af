"""Group scoring shared by the score-and-keep baselines (``magnitude``, ``activation``, ``fluctuation``)."""

from __future__ import annotations

import torch

from osscar_opt.problem import LayerProblem


def top_groups(scores: torch.Tensor, keep: int) -> list[int]:
    """Ids of the ``keep`` largest scores (ties broken by the lower id)."""
    order = torch.argsort(-scores.to(torch.float64).cpu(), stable=True)
    return sorted(order[:keep].tolist())


def group_sums(problem: LayerProblem, column_values: torch.Tensor) -> torch.Tensor:
    """Sum of ``column_values`` (p_in,) over each group's columns: (num_groups,)."""
    values = column_values.to(torch.float64).cpu()
    return torch.stack([values[cols].sum() for cols in problem.groups])


def input_energy(problem: LayerProblem) -> torch.Tensor:
    """``diag(X^T X)`` over the layer inputs (p_in,): the problem's ``xtx_diag``, else ``diag(H) - lam``."""
    p_in = problem.num_inputs
    if problem.xtx_diag is not None:
        return problem.xtx_diag[:p_in].to(torch.float64).cpu()
    return (torch.diagonal(problem.H)[:p_in].to(torch.float64).cpu() - problem.lam).clamp_min(0)


def weighted_group_scores(problem: LayerProblem, input_weight: torch.Tensor) -> torch.Tensor:
    """Per group, the sum over its columns of ``||W_{:,j}||^2 * input_weight_j`` (num_groups,)."""
    weight = problem.reference_weight().to(torch.float64).cpu()
    return group_sums(problem, weight.square().sum(0) * input_weight.to(torch.float64).cpu())
