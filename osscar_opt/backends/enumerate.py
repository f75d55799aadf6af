"""``enumerate``: exact by enumerating every support of size ``keep`` (the test oracle).

Refuses problems with more than ``max_subsets`` candidate supports (default 200,000).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from osscar_opt.backends.base import Backend, SearchResult, check_options
from osscar_opt.problem import LayerProblem


class EnumerateBackend(Backend):
    """Brute force over all ``C(num_groups, keep)`` supports; status "optimal"."""

    name = "enumerate"
    options = ("max_subsets",)
    exact = True

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
        check_options(self.name, options, self.options)
        max_subsets = options.get("max_subsets", 200_000)
        if isinstance(max_subsets, bool) or not isinstance(max_subsets, int) or max_subsets < 1:
            raise ValueError(f"max_subsets: expected a positive integer, got {max_subsets!r}")
        count = math.comb(problem.num_groups, keep)
        if count > max_subsets:
            raise ValueError(
                f"keep: enumerating C({problem.num_groups}, {keep}) = {count} supports exceeds "
                f"max_subsets={max_subsets}; use an exact MIP backend (gurobi, cvxpy) or raise max_subsets"
            )
        H = problem.H.to(torch.float64)
        G = problem.G.to(torch.float64)
        always = problem.always_kept_columns.to(H.device)
        groups = [cols.to(H.device) for cols in problem.groups]
        best_loss, best_support = math.inf, ()
        for support in itertools.combinations(range(problem.num_groups), keep):
            columns = torch.cat([always] + [groups[g] for g in support])
            factor = torch.linalg.cholesky(H[columns][:, columns])
            kept_t = torch.cholesky_solve(G[columns], factor)
            loss = problem.c0 - float((G[columns] * kept_t).sum())
            if loss < best_loss:
                best_loss, best_support = loss, support
        return SearchResult(best_support, status="optimal", lower_bound=best_loss, info={"supports": count})
