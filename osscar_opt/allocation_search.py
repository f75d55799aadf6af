"""Allocation search: per-structure keeps at equal cost, scored on the model's own output.

The dynamic program (:mod:`osscar_opt.allocate`) picks keeps that minimize *summed layer losses*.
Layer losses do not add up to the model's error, so :func:`search_allocation` starts from the
program's answer and moves budget between structures, scoring every candidate with a function the
caller gives (the pipeline's: the model's output on held-out samples against the dense model's,
:mod:`osscar_opt.pipeline.search`). Two methods (docs/targets.md, "Searching the allocation"):

* ``"moves"``: one move at a time: raise one structure by one grid step, lower another by as
  few steps as the cost target needs; kept when it scores better (a (1+1) search over the
  budget-moving neighbourhood);
* ``"evolution"``: EvoPress's (1 + lambda) scheme: each generation ``offspring`` children of
  the parent, each one to three moves away, are scored on a first share of the samples; the best
  ``survivors`` are scored on all of them; the best child replaces the parent when it is better.

Every candidate costs at most the capacity (the caller's ``cost_of``, the same function that
checked the start); the answer never scores worse than the start on the samples scored (only a
strictly better full score replaces the best). Evaluations are counted in full-sample units (a
score on a quarter of the samples counts a quarter).

Knows no model and no torch module: keeps, costs and a score function.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from osscar_opt.allocate import Choices

SEARCH_METHODS = ("moves", "evolution")
DEFAULT_EVALUATIONS = 64
MIN_SCORE_SAMPLES = 4
"""The fewest held-out samples a search scores on (fewer make every comparison noise)."""
COST_TOLERANCE = 1e-9


class AllocationSearch:
    """How a :class:`~osscar_opt.budget.CostTarget`'s allocation is searched after the dynamic program.

    Args:
        calibration: the held-out samples candidates are scored on, in the form of ``prune``'s
            calibration (token ids ``(samples, seq_len)`` or images); drawn from documents the
            calibration samples do not come from, so the search does not fit the calibration text.
            At least :data:`MIN_SCORE_SAMPLES`.
        evaluations: the most candidate scores (in full-sample units), a positive integer.
        seconds: a time budget for the search (None: none); the search stops at whichever of
            ``evaluations`` and ``seconds`` comes first.
        seed: the random seed of the moves.
        method: ``"moves"`` or ``"evolution"`` (:data:`SEARCH_METHODS`).
        offspring, survivors: ``"evolution"`` only: children per generation, and how many of them
            are scored on all samples after the first share.
    """

    def __init__(self, calibration: Any, *, evaluations: int = DEFAULT_EVALUATIONS, seconds: float | None = None,
                 seed: int = 0, method: str = "moves", offspring: int = 8, survivors: int = 2) -> None:
        if calibration is None:
            raise ValueError("search calibration: expected held-out samples to score candidates on, got None")
        self.calibration = calibration
        self.evaluations = check_positive_int(evaluations, "evaluations")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float)
                                    or not math.isfinite(seconds) or seconds <= 0):
            raise ValueError(f"seconds: expected a positive number of seconds or None, got {seconds!r}")
        self.seconds = None if seconds is None else float(seconds)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an integer, got {seed!r}")
        self.seed = seed
        if method not in SEARCH_METHODS:
            raise ValueError(f"method: expected one of {list(SEARCH_METHODS)}, got {method!r}")
        self.method = method
        self.offspring = check_positive_int(offspring, "offspring")
        self.survivors = check_positive_int(survivors, "survivors")
        if self.survivors > self.offspring:
            raise ValueError(f"survivors: expected at most offspring ({self.offspring}), got {survivors!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations, "seconds": self.seconds, "seed": self.seed, "method": self.method,
                "offspring": self.offspring, "survivors": self.survivors}

    def __repr__(self) -> str:
        return f"AllocationSearch(method={self.method!r}, evaluations={self.evaluations}, seed={self.seed})"


def check_positive_int(value: object, name: str) -> int:
    """``value`` when it is a positive integer (bools refused), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


Score = Callable[[Mapping[str, int], float], tuple[float, float]]
"""``score(keep, share) -> (distance, used)``: the candidate's distance to the dense model (smaller
is better) on about the first ``share`` (0 < share <= 1) of the held-out samples, and the share it
actually used (whole batches)."""


@dataclass
class SearchResult:
    """What :func:`search_allocation` found.

    Attributes:
        start, keep: the starting allocation and the best one found (``{name: keep}``).
        start_score, score: their scores on all samples.
        evaluations: candidate scores spent, in full-sample units; ``seconds``: wall time.
        trace: one entry per full-sample score: ``evaluation`` (units spent so far), ``seconds``,
            ``score``, ``best`` (after it), ``accepted`` and the ``moves`` (``[raised, lowered]``
            names) that made the candidate.
        stopped: ``"evaluations"``, ``"seconds"`` or ``"no moves"`` (no feasible move exists).
    """

    start: dict[str, int]
    keep: dict[str, int]
    start_score: float
    score: float
    evaluations: float = 0.0
    seconds: float = 0.0
    trace: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "evaluations"

    def to_dict(self) -> dict[str, Any]:
        return {"start_keep": dict(self.start), "keep": dict(self.keep), "start_score": self.start_score,
                "score": self.score, "evaluations": self.evaluations, "seconds": self.seconds,
                "stopped": self.stopped, "trace": list(self.trace)}


class _Moves:
    """The budget-moving neighbourhood: raise one structure a grid step, lower another until the
    candidate's cost is within the capacity again."""

    def __init__(self, choices: Sequence[Choices], cost_of: Callable[[Mapping[str, int]], float], capacity: float,
                 rng: random.Random) -> None:
        self.choices = {c.name: c for c in choices}
        self.names = sorted(self.choices)
        self.cost_of = cost_of
        self.capacity = capacity
        self.rng = rng

    def feasible(self, keep: Mapping[str, int]) -> bool:
        return self.cost_of(keep) <= self.capacity + COST_TOLERANCE * max(1.0, abs(self.capacity))

    def step(self, keep: Mapping[str, int], name: str, direction: int) -> int | None:
        keeps = self.choices[name].keeps
        index = keeps.index(keep[name]) + direction
        return keeps[index] if 0 <= index < len(keeps) else None

    def move(self, keep: Mapping[str, int], tries: int = 64) -> tuple[dict[str, int], list[str]] | None:
        """A feasible neighbour of ``keep`` and ``[raised, lowered]`` (lowered may be absent when the
        slack pays for the raise), or None after ``tries`` draws found none."""
        if len(self.names) < 2:
            return None
        for _ in range(tries):
            raised, lowered = self.rng.sample(self.names, 2)
            higher = self.step(keep, raised, +1)
            if higher is None:
                continue
            candidate = {**keep, raised: higher}
            if self.feasible(candidate):
                return candidate, [raised]
            while (lower := self.step(candidate, lowered, -1)) is not None:
                candidate[lowered] = lower
                if self.feasible(candidate):
                    return candidate, [raised, lowered]
        return None


def search_allocation(
    choices: Sequence[Choices],
    start: Mapping[str, int],
    cost_of: Callable[[Mapping[str, int]], float],
    capacity: float,
    score: Score,
    settings: AllocationSearch,
    *,
    first_share: float = 0.25,
    progress: bool = False,
) -> SearchResult:
    """Search keeps at cost ``<= capacity`` that score better than ``start`` (see the module docstring).

    Args:
        choices: the structures' grids (``keeps``; losses and costs are not read here: ``cost_of``
            prices a whole allocation, pair terms included).
        start: the dynamic program's allocation (every name of ``choices``, each keep on its grid,
            within the capacity).
        cost_of: a whole allocation's cost (the same units as ``capacity``).
        score: ``score(keep, share)`` (:data:`Score`).
        first_share: ``"evolution"``: the share of samples every child is scored on first.
    """
    from tqdm.auto import tqdm

    moves = _Moves(choices, cost_of, capacity, random.Random(settings.seed))
    missing = sorted(set(moves.names) - set(start))
    if missing:
        raise ValueError(f"start: no keep for {missing}")
    if not moves.feasible(start):
        raise ValueError(f"start: costs {cost_of(start):g}, above the capacity {capacity:g}")
    clock = time.perf_counter()
    best = dict(start)
    best_score, _ = score(best, 1.0)
    result = SearchResult(start=dict(start), keep=best, start_score=best_score, score=best_score, evaluations=1.0)
    result.trace.append({"evaluation": 1.0, "seconds": time.perf_counter() - clock, "score": best_score,
                         "best": best_score, "accepted": True, "moves": []})
    bar = tqdm(total=settings.evaluations, desc="allocation search", unit="eval", disable=not progress)
    bar.update(1)

    def out_of_time(next_cost: float = 0.0) -> str | None:
        """Why the search must stop before spending ``next_cost`` more evaluations (None: it may go on)."""
        if result.evaluations + next_cost > settings.evaluations + 1e-9 or result.evaluations >= settings.evaluations:
            return "evaluations"
        if settings.seconds is not None and time.perf_counter() - clock >= settings.seconds:
            return "seconds"
        return None

    def record(candidate: dict[str, int], value: float, made_by: list[list[str]]) -> None:
        nonlocal best, best_score
        accepted = value < best_score
        if accepted:
            best, best_score = candidate, value
        result.trace.append({"evaluation": round(result.evaluations, 4), "seconds": time.perf_counter() - clock,
                             "score": value, "best": best_score, "accepted": accepted, "moves": made_by})

    while (stop := out_of_time()) is None:
        spent = result.evaluations
        if settings.method == "moves":
            if out_of_time(1.0) is not None:
                stop = "evaluations"
                break
            found = moves.move(best)
            if found is None:
                stop = "no moves"
                break
            candidate, made_by = found
            value, used = score(candidate, 1.0)
            result.evaluations += used
            record(candidate, value, [made_by])
        else:
            children = _children(moves, best, settings.offspring)
            if not children:
                stop = "no moves"
                break
            share = min(1.0, first_share)
            if share < 1.0:
                ranked = []
                for candidate, made_by in children:
                    if out_of_time(share) is not None:
                        break
                    value, used = score(candidate, share)
                    ranked.append((value, candidate, made_by))
                    result.evaluations += used
                ranked.sort(key=lambda item: item[0])
                children = [(candidate, made_by) for _, candidate, made_by in ranked[:settings.survivors]]
            for candidate, made_by in children:
                if out_of_time(1.0) is not None:
                    break
                value, used = score(candidate, 1.0)
                result.evaluations += used
                record(candidate, value, made_by)
        bar.update(result.evaluations - spent)
    bar.close()
    result.keep, result.score = best, best_score
    result.seconds = time.perf_counter() - clock
    result.stopped = stop
    return result


def _children(moves: _Moves, parent: Mapping[str, int], count: int) -> list[tuple[dict[str, int], list[list[str]]]]:
    """``count`` distinct feasible children of ``parent``, each one to three moves away."""
    children, seen = [], {tuple(sorted(parent.items()))}
    for _ in range(4 * count):
        if len(children) == count:
            break
        candidate, made_by = dict(parent), []
        for _ in range(moves.rng.randint(1, 3)):
            found = moves.move(candidate)
            if found is None:
                break
            candidate, names = found
            made_by.append(names)
        key = tuple(sorted(candidate.items()))
        if made_by and key not in seen:
            seen.add(key)
            children.append((candidate, made_by))
    return children
