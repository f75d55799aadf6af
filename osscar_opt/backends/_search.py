"""The staged-removal and swap-move search on a :class:`KeptSet`, shared by three callers.

- the ``local-search`` backend runs :func:`local_search` (the algorithm and its options are
  described in :mod:`osscar_opt.backends.local_search`, docs/architecture.md, "Local search");
- the ``greedy`` backend runs :func:`greedy`, staged removal with one group per stage;
- the exact backends (``gurobi``, ``cvxpy``) take their default warm start from
  :func:`local_search` with default options (the same support the ``local-search`` backend finds).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from osscar_opt.backends._lowrank import KeptSet
from osscar_opt.backends._scores import input_energy, top_groups, weighted_group_scores
from osscar_opt.backends.base import SearchResult
from osscar_opt.problem import LayerProblem
from osscar_opt.solution import PathPoint

LOCAL_SEARCH_OPTIONS = (
    "stages",
    "max_swaps",
    "swap_size",
    "swap_candidates",
    "time_limit",
    "seed",
    "device",
    "dtype",
    "warm_start",
    "refresh_every",
    "restarts",
    "restart_patience",
    "score_candidates",
)


# Restarts (perturb half of the smaller side at random, swap again, keep the best) cost
# milliseconds on small layers (attention heads) and lift 1-swap local optima there; on large
# layers they would multiply the run time, so they are off by default.
SMALL_PROBLEM_GROUPS = 128
SMALL_PROBLEM_COLUMNS = 1024
SMALL_PROBLEM_RESTARTS = 8


def stage_sizes(total: int, stages: int) -> list[int]:
    """Split ``total`` removals evenly over ``stages`` stages (larger stages first)."""
    stages = max(1, min(stages, total))
    base, extra = divmod(total, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def parse_dtype(dtype: Any) -> torch.dtype:
    """Accept torch dtypes or the strings "float64" / "float32"."""
    if isinstance(dtype, torch.dtype) and dtype in (torch.float64, torch.float32):
        return dtype
    if dtype in ("float64", "double", "fp64"):
        return torch.float64
    if dtype in ("float32", "float", "fp32"):
        return torch.float32
    raise ValueError(f"dtype: expected torch.float64 or torch.float32, got {dtype!r}")


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def staged_removal(
    state: KeptSet,
    keep: int,
    stages: int,
    dead: torch.Tensor,
    deadline: float | None,
) -> list[PathPoint]:
    """Remove groups down to ``keep`` in ``stages`` stages; dead groups go first. Returns the path."""
    path = [PathPoint(len(state.support()), state.support(), state.loss)]
    total = int(state.kept_group.sum()) - keep
    if total <= 0:
        return path
    dead_kept = torch.nonzero(dead & state.kept_group).flatten()
    if dead_kept.numel():
        scores = state.removal_scores()
        order = dead_kept[torch.argsort(scores[dead_kept], stable=True)]
        state.remove_groups(order[: min(total, order.numel())].tolist())
        path.append(PathPoint(len(state.support()), state.support(), state.loss))
        total = int(state.kept_group.sum()) - keep
    for count in stage_sizes(total, stages) if total > 0 else []:
        scores = state.removal_scores()
        order = torch.argsort(scores, stable=True)[:count]
        state.remove_groups(order.tolist())
        path.append(PathPoint(len(state.support()), state.support(), state.loss))
        if deadline is not None and time.perf_counter() > deadline and int(state.kept_group.sum()) > keep:
            # Out of time: finish in one stage so the budget is always met.
            rest = int(state.kept_group.sum()) - keep
            order = torch.argsort(state.removal_scores(), stable=True)[:rest]
            state.remove_groups(order.tolist())
            path.append(PathPoint(len(state.support()), state.support(), state.loss))
            break
    return path


PIVOT_TOLERANCE = 1e-8
"""Relative Schur pivot (``lambda_min(S) / max diag H_aa``) below which an add is verified from scratch:
measured on duplicated columns, float64 low-rank scores went wrong at ridge 1e-10 and 1e-12 and
stayed right at 1e-8."""


class SwapSearch:
    """The swap phase on a :class:`KeptSet` that already holds ``keep`` groups."""

    def __init__(
        self,
        state: KeptSet,
        excluded: torch.Tensor,
        *,
        swap_candidates: int,
        refresh_every: int,
        tolerance: float,
    ) -> None:
        self.state = state
        self.excluded = excluded
        self.swap_candidates = swap_candidates
        self.refresh_every = refresh_every
        self.tolerance = tolerance
        self.accepted = 0
        self.tried = 0
        self.rejected_ill_conditioned = 0

    def improves(self, new_loss: float, old_loss: float) -> bool:
        return new_loss < old_loss - self.tolerance * max(abs(old_loss), 1e-300)

    def maybe_refresh(self) -> None:
        if self.state.updates_since_refresh >= self.refresh_every:
            self.state.refresh()

    def batch_move(self, size: int) -> bool:
        """Drop ``size`` least-salient kept groups, add the ``size`` best outside, if that is better.

        The move is scored exactly before it is applied, so a failed move costs no update.
        """
        state = self.state
        self.tried += 1
        kept = int(state.kept_group.sum())
        live_outside = int((~state.kept_group & ~self.excluded).sum())
        size = min(size, kept, live_outside)
        if size == 0:
            return False
        drop = torch.argsort(state.removal_scores(), stable=True)[:size].tolist()
        new_loss, add = state.score_batch_move(drop, size, self.excluded)
        if len(add) != len(drop) or sorted(add) == sorted(drop) or not self.improves(new_loss, state.loss):
            return False
        return self.apply(drop, add)

    def apply(self, drop: list[int], add: list[int]) -> bool:
        """Apply a move scored as improving. When the added columns are numerically dependent on
        the kept ones (relative pivot below :data:`PIVOT_TOLERANCE`), the low-rank scores cannot be
        trusted: the loss is recomputed from scratch, and a move that does not really improve is
        undone and its added groups are excluded from later adds (counted in the info)."""
        state = self.state
        old_loss, before = state.loss, state.kept_group.clone()
        state.remove_groups(drop)
        state.add_groups(add)
        if state.last_add_pivot < PIVOT_TOLERANCE:
            state.refresh()
            if not self.improves(state.loss, old_loss):
                state.kept_group.copy_(before)
                state.refresh()
                self.excluded[torch.as_tensor(add, device=self.excluded.device)] = True
                self.rejected_ill_conditioned += len(add)
                return False
        self.accepted += 1
        self.maybe_refresh()
        return True

    def single_swap(self) -> bool:
        """Take the exact best single swap if it lowers the loss."""
        state = self.state
        self.tried += 1
        scores = state.removal_scores()
        kept_count = int(state.kept_group.sum())
        count = min(self.swap_candidates, kept_count)
        candidates = torch.argsort(scores, stable=True)[:count]
        while True:
            new_loss, drop, add = state.best_swap(candidates, self.excluded)
            if drop < 0 or not self.improves(new_loss, state.loss):
                return False
            rejected = self.rejected_ill_conditioned
            if self.apply([drop], [add]):
                return True
            if self.rejected_ill_conditioned == rejected:
                return False
            # an ill-conditioned swap was undone and its group excluded: look for the next best


def swap_loop(search: SwapSearch, swap_size: int, max_swaps: int, deadline: float | None) -> None:
    """Batch moves of halving size, then best single swaps, until none improves or a budget is spent."""
    size = swap_size
    moves = 0
    while moves < max_swaps:
        if deadline is not None and time.perf_counter() > deadline:
            return
        moves += 1
        if size > 1:
            if not search.batch_move(size):
                size //= 2
        elif not search.single_swap():
            return


def _perturb(state: KeptSet, dead: torch.Tensor, count: int, generator: torch.Generator) -> None:
    """Swap ``count`` random kept groups for random live outside groups (a restart)."""
    kept = torch.nonzero(state.kept_group).flatten().cpu()
    outside = torch.nonzero(~state.kept_group & ~dead).flatten().cpu()
    count = min(count, kept.numel(), outside.numel())
    if count == 0:
        return
    drop = kept[torch.randperm(kept.numel(), generator=generator)[:count]]
    add = outside[torch.randperm(outside.numel(), generator=generator)[:count]]
    state.remove_groups(drop.tolist())
    state.add_groups(add.tolist())
    if state.last_add_pivot < PIVOT_TOLERANCE:
        state.refresh()  # random adds of (nearly) dependent columns: low-rank buffers cannot be trusted


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def score_supports(problem: LayerProblem, keep: int) -> dict[str, tuple[int, ...]]:
    """The supports of the activation (Wanda-sp) and magnitude scores at ``keep``, as candidates."""
    energy = input_energy(problem)
    return {"activation score": tuple(top_groups(weighted_group_scores(problem, energy), keep)),
            "magnitude score": tuple(top_groups(weighted_group_scores(problem, torch.ones_like(energy)), keep))}


def _heldout_choice(problem: LayerProblem, candidates: dict[str, tuple[int, ...]]) -> tuple[tuple[int, ...], dict]:
    """The candidate support whose re-fit weights have the lowest held-out error (first on ties)."""
    errors: dict[tuple[int, ...], float] = {}
    chosen, label = None, ""
    for name, support in candidates.items():
        if support not in errors:
            errors[support] = float(problem.heldout_error(support))
            if chosen is None or errors[support] < errors[chosen]:
                chosen, label = support, name
    return chosen, {"heldout_candidate": label, "heldout_candidates": len(errors), "heldout_error": errors[chosen]}


def local_search(problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
    """OSSCAR local combinatorial search: staged removal + exact swap moves + restarts.

    ``options`` are those of the ``local-search`` backend (:data:`LOCAL_SEARCH_OPTIONS`, checked
    by the caller); without any, the defaults of that backend.
    """
    start = time.perf_counter()
    num_groups = problem.num_groups
    removal_count = num_groups - keep
    stages = _positive_int("stages", options.get("stages", min(max(removal_count, 1), 8)))
    max_swaps = _positive_int("max_swaps", options.get("max_swaps", 200), minimum=0)
    default_swap = max(1, min(keep, removal_count) // 64)
    swap_size = _positive_int("swap_size", options.get("swap_size", default_swap))
    swap_candidates = _positive_int("swap_candidates", options.get("swap_candidates", 128))
    refresh_every = _positive_int("refresh_every", options.get("refresh_every", 64))
    small = num_groups <= SMALL_PROBLEM_GROUPS and problem.num_columns <= SMALL_PROBLEM_COLUMNS
    default_restarts = SMALL_PROBLEM_RESTARTS if small else 0
    restarts = _positive_int("restarts", options.get("restarts", default_restarts), minimum=0)
    patience = options.get("restart_patience")
    patience = restarts if patience is None else _positive_int("restart_patience", patience)
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    time_limit = options.get("time_limit")
    if time_limit is not None and (isinstance(time_limit, bool) or not time_limit > 0):
        raise ValueError(f"time_limit: expected a positive number of seconds, got {time_limit!r}")
    deadline = None if time_limit is None else start + float(time_limit)
    dtype = parse_dtype(options.get("dtype", torch.float64))
    device = options.get("device")
    warm_start = options.get("warm_start")
    initial = range(num_groups) if warm_start is None else problem.check_support(warm_start, "warm_start")
    if len(initial) < keep:
        raise ValueError(f"warm_start: has {len(initial)} groups, fewer than keep={keep}")

    state = KeptSet(problem, initial, device=device, dtype=dtype)
    dead = torch.zeros(num_groups, dtype=torch.bool, device=state.device)
    dead_ids = problem.dead_groups()
    if dead_ids:
        dead[dead_ids] = True
    path = staged_removal(state, keep, stages, dead, deadline)
    after_removal = state.loss
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    search = SwapSearch(
        state, dead, swap_candidates=swap_candidates, refresh_every=refresh_every, tolerance=tolerance
    )
    restarts_run = 0
    candidates = {"removal": state.support()}
    if 0 < keep < num_groups and max_swaps > 0:
        state.track_outside()
        swap_loop(search, swap_size, max_swaps, deadline)
        best_support, best_loss = state.support(), state.loss
        candidates["swaps"] = best_support
        generator = torch.Generator().manual_seed(seed)
        stale = 0
        for _ in range(restarts):
            if (deadline is not None and time.perf_counter() > deadline) or stale >= patience:
                break
            _perturb(state, dead, max(1, (min(keep, removal_count) + 1) // 2), generator)
            swap_loop(search, swap_size, max_swaps, deadline)
            restarts_run += 1
            candidates[f"restart {restarts_run}"] = state.support()
            if search.improves(state.loss, best_loss):
                best_support, best_loss, stale = state.support(), state.loss, 0
            else:
                stale += 1
        if small and warm_start is None and stages < removal_count:
            # Small layers: also descend one group per stage (greedy) and swap from there; the
            # two descents end in different 1-swap optima often enough to be worth milliseconds.
            greedy_state = KeptSet(problem, range(num_groups), device=device, dtype=dtype)
            staged_removal(greedy_state, keep, removal_count, dead, deadline)
            greedy_state.track_outside()
            greedy_search = SwapSearch(
                greedy_state, dead, swap_candidates=swap_candidates, refresh_every=refresh_every,
                tolerance=tolerance,
            )
            swap_loop(greedy_search, swap_size, max_swaps, deadline)
            candidates["greedy descent"] = greedy_state.support()
            if search.improves(greedy_state.loss, best_loss):
                best_support, best_loss = greedy_state.support(), greedy_state.loss
        support = best_support
    else:
        support = state.support()
    heldout_info = {}
    if problem.heldout is not None:
        if _flag("score_candidates", options.get("score_candidates", False)):
            # the one-line scores' supports compete on held-out error too: in-sample optima fit
            # what is specific to the calibration text; a score that ignores it may generalize better
            candidates.update(score_supports(problem, keep))
        support, heldout_info = _heldout_choice(problem, candidates)
    info = {
        "stages": len(path) - 1,
        "loss_after_removal": after_removal,
        "swaps_accepted": search.accepted,
        "ill_conditioned_rejected": search.rejected_ill_conditioned,
        "moves_tried": search.tried,
        "dead_groups": len(dead_ids),
        "restarts_run": restarts_run,
        "device": str(state.device),
        "dtype": str(dtype).replace("torch.", ""),
        **heldout_info,
    }
    status = "heuristic"
    if deadline is not None and time.perf_counter() > deadline:
        status = "time_limit"
    return SearchResult(support=support, status=status, path=path, info=info)


def greedy(problem: LayerProblem, keep: int, *, device: Any = None, dtype: Any = torch.float64) -> SearchResult:
    """ZipLM-style elimination: staged removal with one group per stage (dead groups first)."""
    dtype = parse_dtype(dtype)
    state = KeptSet(problem, range(problem.num_groups), device=device, dtype=dtype)
    dead = torch.zeros(problem.num_groups, dtype=torch.bool, device=state.device)
    dead_ids = problem.dead_groups()
    if dead_ids:
        dead[dead_ids] = True
    start = time.perf_counter()
    removal_count = problem.num_groups - keep
    path = staged_removal(state, keep, max(removal_count, 1), dead, deadline=None)
    info = {"steps": removal_count, "dead_groups": len(dead_ids), "loop_seconds": time.perf_counter() - start}
    return SearchResult(support=state.support(), path=path, info=info)
