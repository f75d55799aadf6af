"""``greedy``: ZipLM-style one-at-a-time elimination by exact structured OBS saliency.

At each step the kept group whose removal raises the loss least (``trace(What_q (Hinv_qq)^{-1}
What_q^T)``) is removed, followed by a rank-d downdate of ``Hinv`` and of the kept weights. This is
the peer OSSCAR's local search is compared with; its path holds a support for every budget.
"""

from __future__ import annotations

from typing import Any

import torch

from osscar_opt.backends._search import greedy
from osscar_opt.backends.base import Backend, SearchResult, check_options
from osscar_opt.problem import LayerProblem

OPTIONS = ("device", "dtype")


class GreedyBackend(Backend):
    """One group per step, exact saliency, low-rank downdates (see module doc)."""

    name = "greedy"
    options = OPTIONS

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
        check_options(self.name, options, OPTIONS)
        return greedy(problem, keep, device=options.get("device"), dtype=options.get("dtype", torch.float64))
