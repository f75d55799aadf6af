"""``greedy``: ZipLM-style one-at-a-time elimination by exact structured OBS saliency.

At each step the kept group whose removal raises the loss least (``trace(What_q (Hinv_qq)^{-1}
What_q^T)``) is removed, followed by a rank-d downdate of ``Hinv`` and of the kept weights. This is
the peer OSSCAR's local search is compared with; its path holds a support for every budget.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from osscar_opt.backends._lowrank import KeptSet
from osscar_opt.backends.base import Backend, SearchResult, check_options
from osscar_opt.backends.local_search import parse_dtype, staged_removal
from osscar_opt.problem import LayerProblem

OPTIONS = ("device", "dtype")


class GreedyBackend(Backend):
    """One group per step, exact saliency, low-rank downdates (see module doc)."""

    name = "greedy"
    options = OPTIONS

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
        check_options(self.name, options, OPTIONS)
        dtype = parse_dtype(options.get("dtype", torch.float64))
        state = KeptSet(problem, range(problem.num_groups), device=options.get("device"), dtype=dtype)
        dead = torch.zeros(problem.num_groups, dtype=torch.bool, device=state.device)
        dead_ids = problem.dead_groups()
        if dead_ids:
            dead[dead_ids] = True
        start = time.perf_counter()
        removal_count = problem.num_groups - keep
        path = staged_removal(state, keep, max(removal_count, 1), dead, deadline=None)
        info = {"steps": removal_count, "dead_groups": len(dead_ids), "loop_seconds": time.perf_counter() - start}
        return SearchResult(support=state.support(), path=path, info=info)
