"""Equal counts per block: layer problems whose groups must be kept in equal numbers per block.

The query heads of a GQA attention layer (structure kind ``q_heads``) are the groups of the output
projection's problem; the stock forward code repeats every key-value head for the same number of
query heads, so a support must keep the same number of query heads in every KV group. The
groups of such a problem fall into ``blocks`` equal consecutive blocks (group ``g`` is in block
``g // (num_groups / blocks)``) and a support keeps ``per_block`` groups of each.

:func:`solve_balanced` finds that support:

* when there are at most :data:`ENUMERATION_LIMIT` balanced supports, by evaluating every one
  (the proven optimum, status ``"optimal"``);
* otherwise the backend solves the problem with the total count (``per_block * blocks``) and no
  block constraint; blocks over their count then give up the group whose removal raises the loss
  least and blocks under it take the group whose addition lowers it most, one exact move at a
  time, until every block has ``per_block``; then exact swaps inside each block while one lowers
  the loss (status ``"heuristic"``).

Like the backends it knows no model: only the problem, the blocks and the count.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

from osscar_opt.backends.base import SearchResult
from osscar_opt.curves import Curve, relative_value
from osscar_opt.problem import LayerProblem
from osscar_opt.solution import Solution
from osscar_opt.solving import finish, solve

ENUMERATION_LIMIT = 4096
"""Balanced supports evaluated one by one when there are at most this many."""
MAX_SWAP_ROUNDS = 8
"""Rounds of in-block swaps after the repair (each round tries every block once)."""


def check_blocks(problem: LayerProblem, blocks: int, per_block: int) -> int:
    """The block size ``num_groups / blocks``; a ValueError names what is wrong."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1 or problem.num_groups % blocks:
        raise ValueError(f"blocks: expected a positive divisor of the {problem.num_groups} groups, got {blocks!r}")
    size = problem.num_groups // blocks
    if isinstance(per_block, bool) or not isinstance(per_block, int) or not 1 <= per_block <= size:
        raise ValueError(f"keep: expected an integer from 1 to {size} groups per block (at least one query head "
                         f"per KV group), got {per_block!r}")
    return size


def balanced_supports(num_groups: int, blocks: int, per_block: int):
    """Every support keeping ``per_block`` groups of each of ``blocks`` equal blocks (sorted tuples)."""
    size = num_groups // blocks
    choices = [[tuple(block * size + g for g in combo) for combo in itertools.combinations(range(size), per_block)]
               for block in range(blocks)]
    for parts in itertools.product(*choices):
        yield tuple(g for part in parts for g in part)


def solve_balanced(problem: LayerProblem, blocks: int, per_block: int, backend: str = "local-search",
                   **options: Any) -> Solution:
    """The best support found that keeps ``per_block`` groups of each of ``blocks`` equal blocks."""
    size = check_blocks(problem, blocks, per_block)
    keep = per_block * blocks
    start = time.perf_counter()
    if per_block == size:
        return solve(problem, keep, backend, **options)
    if math.comb(size, per_block) ** blocks <= ENUMERATION_LIMIT:
        support = min(balanced_supports(problem.num_groups, blocks, per_block), key=problem.loss)
        loss = problem.loss(support)
        result = SearchResult(support, status="optimal", lower_bound=loss,
                              info={"balanced": "enumerated", "supports": math.comb(size, per_block) ** blocks})
        return finish(problem, keep, result, f"{backend}+balanced", time.perf_counter() - start)
    free = solve(problem, keep, backend, **options)
    support, moves = repair(problem, set(free.support), size, per_block)
    support, swaps = swap_within_blocks(problem, support, size)
    result = SearchResult(tuple(sorted(support)), status="heuristic",
                          info={"balanced": "repaired", "repair_moves": moves, "swaps": swaps,
                                "unbalanced_loss": free.loss})
    return finish(problem, keep, result, f"{backend}+balanced", time.perf_counter() - start)


def _block_counts(support: set[int], size: int, blocks: int) -> list[int]:
    counts = [0] * blocks
    for g in support:
        counts[g // size] += 1
    return counts


def repair(problem: LayerProblem, support: set[int], size: int, per_block: int) -> tuple[set[int], int]:
    """Move ``support`` to ``per_block`` groups in every block by exact single removals and additions."""
    blocks = problem.num_groups // size
    moves = 0
    while True:
        counts = _block_counts(support, size, blocks)
        over = [b for b in range(blocks) if counts[b] > per_block]
        under = [b for b in range(blocks) if counts[b] < per_block]
        if not over and not under:
            return support, moves
        if over:
            candidates = [g for g in support if g // size in over]
            drop = min(candidates, key=lambda g: problem.loss(support - {g}))
            support = support - {drop}
        if under:
            candidates = [g for b in under for g in range(b * size, (b + 1) * size) if g not in support]
            add = min(candidates, key=lambda g: problem.loss(support | {g}))
            support = support | {add}
        moves += 1


def swap_within_blocks(problem: LayerProblem, support: set[int], size: int) -> tuple[set[int], int]:
    """Exact best swaps (one kept group for one dropped group of the same block) while one lowers the loss."""
    blocks = problem.num_groups // size
    best = problem.loss(support)
    swaps = 0
    for _ in range(MAX_SWAP_ROUNDS):
        improved = False
        for block in range(blocks):
            members = range(block * size, (block + 1) * size)
            kept = [g for g in members if g in support]
            dropped = [g for g in members if g not in support]
            trials = [((support - {out}) | {into}, out, into) for out in kept for into in dropped]
            if not trials:
                continue
            candidate, _, _ = min(trials, key=lambda trial: problem.loss(trial[0]))
            loss = problem.loss(candidate)
            if loss < best * (1 - 1e-12):
                support, best, improved, swaps = candidate, loss, True, swaps + 1
        if not improved:
            break
    return support, swaps


def balanced_curve(problem: LayerProblem, blocks: int, keeps: list[int], *, name: str = "", kind: str = "",
                   backend: str = "local-search") -> Curve:
    """The loss curve of a blocked problem at per-block ``keeps`` (each point a :func:`solve_balanced`
    support), in the form :func:`osscar_opt.curves.loss_curve` gives for other structures."""
    supports = [solve_balanced(problem, blocks, keep, backend).support for keep in keeps]
    return Curve(name=name, kind=kind, num_groups=problem.num_groups // blocks, keeps=list(keeps),
                 relative=[relative_value(problem, support) for support in supports], supports=supports,
                 heldout=problem.heldout is not None)
