"""``local-search``: OSSCAR's local combinatorial search (docs/architecture.md, "Local search").

1. **Staged removal**: from the full support (or a warm start), remove ``num_groups - keep``
   groups in ``stages`` stages; each stage removes the groups with the smallest exact removal
   scores jointly with one rank-(d * count) downdate. Dead groups (inputs that never fire on the
   calibration data) are removed first, explicitly.
2. **Swap moves**: with swap size ``s`` (default 1/64 of the smaller side), drop the ``s``
   kept groups of least removal score, add the ``s`` outside groups of largest exact add gain
   against the reduced support, keep the move only if the loss went down, else halve ``s``. At
   ``s = 1`` every (kept, outside) pair among ``swap_candidates`` kept groups is scored exactly
   and the best improving single swap is taken, until none improves (a 1-swap local optimum),
   the swap budget or the time limit is spent.
3. **Restarts** (``restarts``, default 8 on problems with at most 128 groups and 1024 columns,
   else 0): perturb half of the smaller side at random (``seed``), run the swap moves again, keep
   the best. ``restart_patience`` (default: all restarts) stops after that many restarts in a row
   that did not improve the best; on small random problems every one of the 8 restarts counts
   (the enumerate optimum on 110 of 110 instances with all 8, on 107 to 109 with patience 2 or 3),
   so the default runs them all. On the same small problems a second descent removes one group per
   stage (greedy elimination) and runs the swap moves from there; the two descents end in
   different 1-swap optima often enough (a 48-neuron layer of a tiny BERT: greedy 0.00786, local
   search alone 0.00796, from the greedy descent 0.00771) to be worth its milliseconds.
4. The best support is returned; ``osscar_opt.solve`` recomputes its loss and weights from scratch.
   When the problem carries held-out moments (``problem.heldout``, set by the pipeline under
   ``damp="auto"``), the candidate (after removal, after swaps, each restart's optimum, the
   greedy descent's optimum) whose re-fit weights have the lowest held-out error is returned
   instead, with ``heldout_candidate`` and ``heldout_error`` in ``info``. With
   ``score_candidates=True`` the supports of the activation (Wanda-sp) and magnitude scores compete
   too (off by default until measured off the calibration domain: ``benchmarks/end_to_end.py``).

Runs in torch on the problem's device (or ``device``), float64 by default (``dtype=torch.float32``
optional).

The algorithm lives in :func:`osscar_opt.backends._search.local_search`, which the exact backends
also run (with default options) for their default warm start.
"""

from __future__ import annotations

from typing import Any

from osscar_opt.backends._search import LOCAL_SEARCH_OPTIONS, local_search
from osscar_opt.backends.base import Backend, SearchResult, check_options
from osscar_opt.problem import LayerProblem

OPTIONS = LOCAL_SEARCH_OPTIONS


class LocalSearchBackend(Backend):
    """OSSCAR local combinatorial search: staged removal + exact swap moves (see module doc)."""

    name = "local-search"
    options = OPTIONS

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
        check_options(self.name, options, OPTIONS)
        return local_search(problem, keep, **options)
