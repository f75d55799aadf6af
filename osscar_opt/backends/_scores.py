"""Group scoring shared by the score-and-keep baselines (``magnitude``, ``activation``)."""

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
