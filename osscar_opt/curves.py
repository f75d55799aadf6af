"""Loss curves: a layer problem's best loss at every keep count of a grid, in one descent.

:func:`loss_curve` walks down from the full support: to reach each grid keep (largest first) it
removes groups by OSSCAR's staged removal from the previous point's support, then runs the exact
swap moves there (a few, ``swaps``) and records the point. One run gives the whole curve; each
point warm-starts the next. The points are the supports the allocation (:mod:`osscar_opt.allocate`)
can pick from; the pipeline later solves the chosen keep again with the full local search.

The curve's value at a keep is *normalized* so that layers compare:

* ``stage`` (default): the loss over the energy of the stage's dense output (the block output:
  the residual stream the layer's output joins, or the layer's own output where a block has no
  residual), ``loss / ||h_out||^2``: the share of the block's signal that is lost. A layer whose
  output is small against the stream it joins can lose more of it;
* ``relative``: the loss over the loss of keeping nothing, ``loss / c0``: the share of the layer's
  own output energy that is lost, every layer counting the same. Measured worse: on
  all-MiniLM-L6-v2 at 70% of the dense MACs it cut the last blocks' MLPs to 6-12% of their neurons
  and lost to the uniform budget (benchmarks/budgets.py; the README has the table).

When the problem carries held-out moments (``damp="auto"``) the value is the held-out error of the
re-fit weights (over the held-out ``||Y||^2``) instead of the fitted loss, so that a layer whose
fit only looks good on the samples it was fit to does not attract the budget.

Knows no torch module: only the :class:`~osscar_opt.problem.LayerProblem`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from osscar_opt.backends._lowrank import KeptSet
from osscar_opt.backends._search import SwapSearch, staged_removal, swap_loop
from osscar_opt.budget import NORMALIZATIONS
from osscar_opt.problem import LayerProblem

DEFAULT_GRID = 32
DEFAULT_CURVE_SWAPS = 16
STAGES_PER_POINT = 4


@dataclass
class Curve:
    """One structure's loss curve.

    Attributes:
        name, kind, num_groups: the structure.
        keeps: grid keep counts, ascending.
        relative: loss over ``c0`` at each keep (held-out error over held-out ``||Y||^2`` when the
            problem had held-out moments).
        supports: the kept group ids found at each keep.
        weight: multiplies ``relative`` into the chosen normalization (1 for ``relative``;
            ``c0 / ||h||^2`` for ``stage``).
        heldout: whether ``relative`` is a held-out error.
    """

    name: str
    kind: str
    num_groups: int
    keeps: list[int]
    relative: list[float]
    supports: list[tuple[int, ...]]
    weight: float = 1.0
    heldout: bool = False

    @property
    def losses(self) -> list[float]:
        """The normalized loss at each keep, ``weight * relative``, made non-increasing in the keep
        (a held-out error can rise with more groups kept; the allocation then sees the best smaller
        keep's value, keeps the larger one on the tie and so spends the budget it is given)."""
        values, best = [], float("inf")
        for value in self.relative:
            best = min(best, self.weight * value)
            values.append(best)
        return values

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document.pop("supports")
        return document


def keep_grid(num_groups: int, points: int = DEFAULT_GRID, minimum: int = 1, multiple: int = 1) -> list[int]:
    """Keep counts the allocation may choose: every count for up to ``points`` groups, else
    ``points`` evenly spaced counts, always with ``num_groups``; none below ``minimum``.
    ``multiple`` > 1: only multiples of it (at most ``points + 1``, evenly spaced), and
    ``num_groups``. Ascending."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"grid: expected a positive integer, got {points!r}")
    minimum = max(1, min(int(minimum), num_groups))
    if multiple > 1:
        aligned = list(range(multiple * max(1, math.ceil(minimum / multiple)), num_groups, multiple))
        if len(aligned) > points:
            aligned = [aligned[round(j * (len(aligned) - 1) / points)] for j in range(points + 1)]
        return sorted(set(aligned) | {num_groups})
    if num_groups <= points:
        return list(range(minimum, num_groups + 1))
    counts = {max(minimum, round(num_groups * j / points)) for j in range(points + 1)}
    return sorted(counts | {num_groups, minimum})


def loss_curve(
    problem: LayerProblem,
    keeps: Sequence[int],
    *,
    swaps: int = DEFAULT_CURVE_SWAPS,
    swap_candidates: int = 64,
    device: Any = None,
    dtype: torch.dtype = torch.float64,
    name: str = "",
    kind: str = "",
) -> Curve:
    """The curve of ``problem`` at ``keeps`` (each in ``[0, num_groups]``) by one warm-started descent.

    ``swaps``: swap moves tried at each point (0: staged removal only, the greedy path). A keep of
    0 (an emptied sublayer) has the empty support: its point is the layer's whole target energy
    (less what a re-fit bias explains), held out under ``damp="auto"``.
    """
    keeps = sorted({int(k) for k in keeps})
    if not keeps or keeps[0] < 0 or keeps[-1] > problem.num_groups or keeps == [0]:
        raise ValueError(f"keeps: expected counts in [0, {problem.num_groups}], at least one positive, got {keeps}")
    state = KeptSet(problem, range(problem.num_groups), device=device, dtype=dtype)
    dead = torch.zeros(problem.num_groups, dtype=torch.bool, device=state.device)
    dead_ids = problem.dead_groups()
    if dead_ids:
        dead[dead_ids] = True
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    search = SwapSearch(state, dead, swap_candidates=swap_candidates, refresh_every=64, tolerance=tolerance)
    supports: dict[int, tuple[int, ...]] = {0: ()}
    for keep in reversed([k for k in keeps if k > 0]):
        removal = len(state.support()) - keep
        if removal > 0:
            staged_removal(state, keep, min(removal, STAGES_PER_POINT), dead, None)
            if swaps > 0 and keep < problem.num_groups:
                if not state.tracking_outside:  # maintained through later removals
                    state.track_outside()
                swap_loop(search, 1, swaps, None)
        supports[keep] = state.support()
    relative = [relative_value(problem, supports[k]) for k in keeps]
    return Curve(
        name=name, kind=kind, num_groups=problem.num_groups, keeps=keeps, relative=relative,
        supports=[supports[k] for k in keeps], heldout=problem.heldout is not None,
    )


def relative_value(problem: LayerProblem, support: tuple[int, ...]) -> float:
    """A curve point's value: the loss over ``c0``, or the held-out error over the held-out ``||Y||^2``."""
    if problem.heldout is not None:
        reference = problem.heldout.y_square
        return float(problem.heldout_error(support)) / reference if reference > 0 else 0.0
    return problem.loss(support) / problem.c0 if problem.c0 > 0 else 0.0


def normalize(curve: Curve, how: str, *, layer_energy: float, stage_energy: float) -> Curve:
    """Set ``curve.weight`` for normalization ``how`` (:data:`NORMALIZATIONS`).

    ``layer_energy``: the layer's dense output energy ``||Y||^2`` per calibration sample;
    ``stage_energy``: the stage output's energy ``||h_out||^2`` per sample.
    """
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {list(NORMALIZATIONS)}, got {how!r}")
    curve.weight = 1.0 if how == "relative" else (layer_energy / stage_energy if stage_energy > 0 else 0.0)
    return curve
