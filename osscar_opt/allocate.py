"""Global allocation: how many groups each structure keeps so that the model meets a cost target.

Every structure ``i`` offers a few keep counts ``keeps_i`` (a grid), each with a normalized loss
``loss_i(k)`` (from its loss curve, :mod:`osscar_opt.curves`) and a cost ``cost_i(k)`` (MACs,
parameters or milliseconds, :mod:`osscar_opt.costs`). The allocation solves

    minimize  sum_i loss_i(k_i)   subject to   sum_i cost_i(k_i) <= capacity,   k_i in keeps_i

by dynamic programming over costs discretized into ``resolution`` units of the slack above the
cheapest choice. Costs are rounded *up*, so the true cost of the answer never exceeds the capacity;
the answer is exact for the discretized problem (a test compares it with brute force). With 60
structures, 33 keeps each and 10,000 units it runs in about 0.1 s. Also here: the uniform baseline
(:func:`uniform_keeps`) and interacting pairs (:func:`allocate_with_pairs`).

Knows no model and no torch module: only numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESOLUTION = 10_000


@dataclass
class Choices:
    """What one structure may keep, and what each choice loses and costs.

    Attributes:
        name: the structure's name (the consumer's qualified name in the model).
        kind: its structure kind (``heads``, ``kv_groups``, ``neurons``, ``channels``).
        keeps: allowed kept-group counts, ascending.
        losses: normalized loss at each keep (any real numbers; smaller is better).
        costs: cost of the structure at each keep (same unit for every structure).
    """

    name: str
    kind: str
    keeps: list[int]
    losses: list[float]
    costs: list[float]

    def __post_init__(self) -> None:
        if not self.keeps or not len(self.keeps) == len(self.losses) == len(self.costs):
            raise ValueError(
                f"choices[{self.name!r}]: keeps, losses and costs must be non-empty and of equal length, got "
                f"{len(self.keeps)}, {len(self.losses)}, {len(self.costs)}"
            )
        for label, values in (("losses", self.losses), ("costs", self.costs)):
            if not all(math.isfinite(float(v)) for v in values):
                raise ValueError(f"choices[{self.name!r}]: {label} must be finite, got {values}")


class InfeasibleTarget(ValueError):
    """No allocation meets the capacity, even with every structure at its smallest keep."""


def floor_cost(choices: Sequence[Choices]) -> float:
    """The smallest total cost any allocation can reach (every structure at its cheapest keep)."""
    return float(sum(min(c.costs) for c in choices))


def allocate(
    choices: Sequence[Choices], capacity: float, *, resolution: int = DEFAULT_RESOLUTION
) -> dict[str, int]:
    """The keep per structure that minimizes the summed loss with total cost at most ``capacity``.

    Args:
        choices: one entry per structure (names unique).
        capacity: the largest total cost allowed (same unit as the choices' costs).
        resolution: cost units the slack ``capacity - floor_cost`` is divided into.

    Returns:
        ``{name: keep}``. Ties go to the larger keep.

    Raises:
        InfeasibleTarget: ``capacity`` is below the cheapest allocation.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution: expected a positive integer, got {resolution!r}")
    names = [c.name for c in choices]
    if len(set(names)) != len(names):
        raise ValueError("choices: structure names must be unique")
    if not choices:
        return {}
    floor = floor_cost(choices)
    slack = float(capacity) - floor
    scale = max(abs(floor), abs(float(capacity)), 1e-300)
    if slack < -1e-12 * scale:
        raise InfeasibleTarget(f"capacity {capacity:g} is below the cheapest allocation {floor:g}")
    slack = max(slack, 0.0)
    units, loss_tables = _discretize(choices, slack, resolution)
    picks = _dynamic_program(units, loss_tables, resolution)
    return {c.name: c.keeps[j] for c, j in zip(choices, picks, strict=True)}


def _discretize(choices: Sequence[Choices], slack: float, resolution: int):
    """Each choice's cost above its structure's cheapest, in units of ``slack / resolution``,
    rounded up; choices that cannot fit even alone get ``resolution + 1`` (never picked)."""
    unit = slack / resolution if slack > 0 else 0.0
    units, losses = [], []
    for c in choices:
        extra = np.asarray(c.costs, dtype=np.float64) - min(c.costs)
        steps = np.ceil(extra / unit - 1e-9).astype(np.int64) if unit > 0 else np.where(extra > 0, resolution + 1, 0)
        units.append(np.clip(steps, 0, resolution + 1))
        losses.append(np.asarray(c.losses, dtype=np.float64))
    return units, losses


def _dynamic_program(units: list[np.ndarray], losses: list[np.ndarray], resolution: int) -> list[int]:
    """``best[c]``: least summed loss of the structures so far with total units ``<= c``."""
    best = np.zeros(resolution + 1)
    picks = []
    for steps, loss in zip(units, losses, strict=True):
        new = np.full(resolution + 1, np.inf)
        pick = np.full(resolution + 1, -1, dtype=np.int32)
        for j in range(len(loss)):  # keeps ascend: on equal loss the larger keep wins (<=)
            step = int(steps[j])
            if step > resolution:
                continue
            candidate = np.full(resolution + 1, np.inf)
            candidate[step:] = best[: resolution + 1 - step] + loss[j]
            better = (candidate <= new) & np.isfinite(candidate)
            new = np.where(better, candidate, new)
            pick = np.where(better, j, pick)
        best = new
        picks.append(pick)
    # Backtrack from the full capacity.
    chosen = []
    remaining = resolution
    for steps, pick in zip(reversed(units), reversed(picks), strict=True):
        j = int(pick[remaining])
        if j < 0:
            raise InfeasibleTarget("no allocation fits the capacity")
        chosen.append(j)
        remaining -= int(steps[j])
    return list(reversed(chosen))


def total(choices: Sequence[Choices], keep: dict[str, int], what: str = "costs") -> float:
    """Summed ``costs`` (or ``losses``) of an allocation ``{name: keep}``."""
    result = 0.0
    for c in choices:
        result += float(getattr(c, what)[c.keeps.index(keep[c.name])])
    return result


def interpolate(xs: Sequence[int], ys: Sequence[float], x: int) -> float:
    """Piecewise-linear ``y(x)`` through the points ``(xs, ys)`` (``xs`` ascending), clamped at the ends."""
    for index in range(1, len(xs)):
        if x <= xs[index]:
            x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[-1]


def _nearest(keeps: Sequence[int], keep: int) -> int:
    """The keep of the grid ``keeps`` nearest to ``keep`` (the smaller on a tie): ``keep`` itself
    on an even grid; the nearest allowed width on an aligned one (``multiple_of``)."""
    return min(keeps, key=lambda k: (abs(k - keep), k))


def uniform_keeps(
    choices: list[Choices], capacity: float, points: int, cost_of: Callable[[dict[str, int]], float]
) -> dict[str, int]:
    """Keeps uniform across layers: every structure of a kind keeps the same fraction ``j / points``
    of its groups (at least its smallest allowed keep); the fraction of each kind (heads against
    neurons) is chosen by the same dynamic program, on the kind's summed curve and cost
    (``cost_of(keep_map)``)."""
    by_kind: dict[str, list[Choices]] = {}
    for choice in choices:
        by_kind.setdefault(choice.kind, []).append(choice)
    kind_choices, keep_maps = [], {}
    for kind, members in by_kind.items():
        maps = []
        for j in range(points + 1):
            keeps = {c.name: _nearest(c.keeps, max(c.keeps[0], round(j / points * c.keeps[-1]))) for c in members}
            if keeps not in maps:
                maps.append(keeps)
        keep_maps[kind] = maps
        kind_choices.append(Choices(
            kind, kind, list(range(len(maps))),
            [sum(interpolate(c.keeps, c.losses, m[c.name]) for c in members) for m in maps],
            [cost_of(m) for m in maps],
        ))
    picks = allocate(kind_choices, capacity)
    return {name: keep for kind, index in picks.items() for name, keep in keep_maps[kind][index].items()}


def joint_choices(first: Choices, second: Choices, delta: float) -> tuple[Choices, list[tuple[int, int]]]:
    """Two interacting structures as one: every pair of keeps, costs with the bilinear term."""
    pairs = [(a, b) for a in first.keeps for b in second.keeps]
    n1, n2 = first.keeps[-1], second.keeps[-1]
    losses = [first.losses[first.keeps.index(a)] + second.losses[second.keeps.index(b)] for a, b in pairs]
    costs = [first.costs[first.keeps.index(a)] + second.costs[second.keeps.index(b)] + delta * (a - n1) * (b - n2)
             for a, b in pairs]
    return Choices(f"{first.name}|{second.name}", first.kind, list(range(len(pairs))), losses, costs), pairs


def allocate_with_pairs(
    choices: Sequence[Choices], capacity: float, pairs: dict[tuple[str, str], float]
) -> dict[str, int]:
    """:func:`allocate` where some pairs of structures interact: ``pairs[(a, b)] = delta`` adds
    ``delta * (k_a - n_a) * (k_b - n_b)`` to the cost (a ResNet bottleneck's middle conv); each
    such pair is allocated as one structure over pairs of keeps (:func:`joint_choices`)."""
    by_name = {c.name: c for c in choices}
    merged, pairs_of = [], {}
    for (first, second), delta in pairs.items():
        if first in by_name and second in by_name:
            joint, keep_pairs = joint_choices(by_name.pop(first), by_name.pop(second), delta)
            merged.append(joint)
            pairs_of[joint.name] = (first, second, keep_pairs)
    picks = allocate([*by_name.values(), *merged], capacity)
    result = {name: keep for name, keep in picks.items() if name not in pairs_of}
    for name, (first, second, keep_pairs) in pairs_of.items():
        result[first], result[second] = keep_pairs[picks[name]]
    return result
