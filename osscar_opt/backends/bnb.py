"""``bnb``: exact solutions by a custom best-first branch and bound on the problem object (no MIP solver).

In the spirit of L0BnB: every node is a partial assignment (groups fixed in, groups fixed out) and
its lower bound is the best of

- the parent's bound (a node's supports are a subset of its parent's);
- the **upper-point cut**: with ``u`` every group not fixed out, the convex perspective function
  ``f`` (equal to the loss at binary points) gives every support ``v <= u`` of the node
  ``loss(v) >= f(u) + grad f(u) . (v - u)``, minimized by dropping the free groups of smallest
  slope; it is at least ``loss(u)`` (the "leaps and bounds" bound of best-subset selection: the
  loss is non-increasing in the support) and exact once no more than ``keep`` groups are left;
- the **perspective relaxation at the partial assignment** (:meth:`PerspectiveFunction.restrict`):
  fixed-in columns always kept, fixed-out columns removed, ``sum z <= keep - |fixed in|`` over the
  rest, with the root's optimized shift (``shift``, default "diagonal": the SDP-optimal diagonal
  of :func:`~osscar_opt.relaxation.block_shift`; it stays valid on every principal submatrix),
  ``node_iterations`` projected-gradient iterations warm-started from the parent's relaxed point,
  stopped as soon as the bound prunes the node.

After the relaxation, **reduced-cost fixing**: a free group whose opposite value would lift the
node's linearization bound past the incumbent is fixed (both estimates are valid bounds of the two
halves of the node). The incumbent starts at the warm start (default: the local-search solution)
and is improved by rounding every node's relaxed point to its ``keep`` largest entries. Branching
takes the free group whose relaxed value is closest to 1/2 (fixed in, fixed out); nodes are
explored best bound first; a node whose bound is within ``rel_gap`` of the incumbent is pruned.

Options: ``formulation`` (only "branch-and-bound"), ``time_limit`` (wall-clock seconds for the
whole call; on expiry the status is "time_limit" and the lower bound is the smallest bound of the
open nodes: valid at any time), ``rel_gap`` / ``mip_gap`` (default 1e-6), ``warm_start`` (as for
the other exact backends), ``shift`` ("scalar", "diagonal" or "block"), ``shift_iterations``
(steps of the shift search, default 40), ``node_iterations`` (default 40), ``node_shift_steps``
(steps of the diagonal shift search re-run at every node on its own problem, warm-started from the
parent's shift; children inherit it; default 0), ``max_nodes`` (default unlimited; status
"node_limit"). The status is "optimal" only when the final gap
``(loss - bound) / loss`` is within ``rel_gap``.

Measured (benchmarks/certify.py, part 4): see the README's "Certification" section.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from osscar_opt.backends import _exact
from osscar_opt.backends.base import Backend, SearchResult, check_options
from osscar_opt.problem import LayerProblem
from osscar_opt.relaxation import (
    BOUND_MARGIN,
    PATTERNS,
    PerspectiveFunction,
    block_shift,
    relax,
    safe_bound,
    scalar_shift,
)


@dataclass(order=True)
class Node:
    """A partial assignment and its lower bound (heap order: bound first)."""

    bound: float
    order: int
    fixed_in: frozenset[int] = field(compare=False)
    fixed_out: frozenset[int] = field(compare=False)
    z: torch.Tensor | None = field(compare=False, default=None)  # relaxed point over all groups
    diagonal: torch.Tensor | None = field(compare=False, default=None)  # the node's diagonal shift (p,)


class BnbBackend(Backend):
    """Best-first branch and bound with perspective-relaxation and upper-point bounds; exact."""

    name = "bnb"
    exact = True
    formulations = ("branch-and-bound",)
    options = ("formulation", "time_limit", "rel_gap", "mip_gap", "warm_start", "shift", "shift_iterations",
               "node_iterations", "node_shift_steps", "max_nodes")

    def solve(self, problem: LayerProblem, keep: int, **options: Any) -> SearchResult:
        check_options(self.name, options, self.options)
        begin = time.perf_counter()
        if options.get("formulation", "branch-and-bound") not in self.formulations:
            raise ValueError(f"formulation: backend 'bnb' has one, 'branch-and-bound'; got {options['formulation']!r}")
        time_limit = _exact.check_positive("time_limit", options.get("time_limit"))
        rel_gap = _exact.check_gap(options)
        shift_name = options.get("shift", "diagonal")
        if shift_name not in ("scalar",) + PATTERNS:
            raise ValueError(f"shift: expected one of {('scalar',) + PATTERNS}, got {shift_name!r}")
        shift_iterations = _exact.check_count("shift_iterations", options.get("shift_iterations", 40), minimum=0)
        node_iterations = _exact.check_count("node_iterations", options.get("node_iterations", 40))
        node_shift_steps = _exact.check_count("node_shift_steps", options.get("node_shift_steps", 0), minimum=0)
        if node_shift_steps and shift_name == "block" and max(problem.group_sizes) > 1:
            raise ValueError("node_shift_steps: re-optimizes a diagonal shift; use shift='diagonal' or 'scalar'")
        max_nodes = options.get("max_nodes")
        if max_nodes is not None:
            max_nodes = _exact.check_count("max_nodes", max_nodes)
        deadline = _exact.deadline_of(begin, time_limit)
        search = _Search(problem, keep, rel_gap, node_iterations, deadline)
        search.node_shift_steps = node_shift_steps
        start = _exact.warm_start(problem, keep, options.get("warm_start", True), time_limit=_exact._share(deadline))
        if start is not None:
            search.offer(start)
        if keep in (0, problem.num_groups):
            support = tuple(range(keep))
            search.offer(support)
            return search.result("optimal", search.incumbent.loss, begin, "trivial budget")
        if shift_name == "scalar" or shift_iterations == 0:
            shift = scalar_shift(problem)
        else:
            shift = block_shift(problem, keep, pattern=shift_name, iterations=shift_iterations,
                                time_limit=_exact._share(deadline))[0]
        search.fn = PerspectiveFunction(problem, shift)
        return search.run(max_nodes, begin)


class _Search:
    """The node queue, the incumbent and the bounding of one branch and bound."""

    def __init__(self, problem: LayerProblem, keep: int, rel_gap: float, node_iterations: int,
                 deadline: float | None) -> None:
        self.problem, self.keep, self.rel_gap = problem, keep, rel_gap
        self.node_iterations, self.deadline = node_iterations, deadline
        self.incumbent = _exact.Incumbent()
        self.fn: PerspectiveFunction | None = None
        self.counter = itertools.count()
        self.nodes = 0
        self.pruned_floor = math.inf  # smallest bound of a node pruned by the gap tolerance
        self.losses: dict[tuple[int, ...], float] = {}
        self.fixed_by_reduced_cost = 0
        self.node_shift_steps = 0
        self.reoptimized = 0

    def offer(self, support) -> float:
        support = tuple(sorted(int(g) for g in support))
        if support not in self.losses:
            self.losses[support] = self.problem.loss(support)
            self.incumbent.offer(support, self.losses[support])
        return self.losses[support]

    def cutoff(self) -> float:
        """Bounds at or above this prune (``rel_gap`` of the incumbent)."""
        loss = self.incumbent.loss
        return loss - self.rel_gap * abs(loss) if math.isfinite(loss) else math.inf

    def bound(self, node: Node) -> Node | None:
        """Fill in ``node``'s bound and relaxed point; None when it is a leaf (its support offered) or pruned."""
        free_count = self.problem.num_groups - len(node.fixed_in) - len(node.fixed_out)
        budget = self.keep - len(node.fixed_in)
        allowed = [g for g in range(self.problem.num_groups) if g not in node.fixed_out]
        if budget == 0 or free_count <= budget:
            self.offer(node.fixed_in if budget == 0 else allowed)
            return None
        node.bound = max(node.bound, self.upper_point_bound(node, allowed, budget))
        if self.pruned(node):
            return None
        restricted, free = self.fn.restrict(node.fixed_in, node.fixed_out, diagonal=node.diagonal)
        start = None if node.z is None else node.z[free]
        result = relax(restricted, budget, iterations=self.node_iterations, start=start, cutoff=self.cutoff())
        node.bound = max(node.bound, result.bound)
        if self.node_shift_steps and node.bound < self.cutoff():
            restricted, result = self.reoptimize_shift(node, restricted, result, budget)
        z = torch.zeros(self.problem.num_groups, dtype=torch.float64, device=result.z.device)
        z[list(node.fixed_in)] = 1.0
        z[free] = result.z
        node.z = z
        self.offer(_exact.support_of(z, self.keep))
        if self.pruned(node):
            return None
        return self.fix_by_reduced_cost(node, free, result, budget)

    def reoptimize_shift(self, node: Node, restricted: PerspectiveFunction, result, budget: int):
        """A few steps of the diagonal shift search on the node's own problem, warm-started from the
        inherited shift; the node (and its children) keep the new shift where it bounds better."""
        problem, columns = restricted.partial_problem(), restricted.columns
        inherited = (self.fn.shift.diagonal if node.diagonal is None else node.diagonal).to(restricted.K)
        shift, _ = block_shift(problem, budget, pattern="diagonal", iterations=self.node_shift_steps,
                               inner_iterations=max(self.node_iterations // 2, 5), start=inherited[columns])
        if shift.diagonal is None:
            return restricted, result
        diagonal = inherited.clone()
        diagonal[columns] = shift.diagonal.to(diagonal)
        candidate, _ = self.fn.restrict(node.fixed_in, node.fixed_out, diagonal=diagonal)
        better = relax(candidate, budget, iterations=self.node_iterations, start=result.z, cutoff=self.cutoff())
        self.reoptimized += 1
        if better.bound <= result.bound:
            return restricted, result
        node.bound, node.diagonal = max(node.bound, better.bound), diagonal
        return candidate, better

    def pruned(self, node: Node) -> bool:
        if node.bound >= self.cutoff():
            self.pruned_floor = min(self.pruned_floor, node.bound)
            return True
        return False

    def upper_point_bound(self, node: Node, allowed: list[int], budget: int) -> float:
        """The cut at the node's upper point ``u`` (every group not fixed out), minimized over the node.

        ``f`` is convex and equals the loss at binary points, so every support ``v`` of the node
        (``v <= u``) has ``loss(v) >= f(u) + grad f(u) . (v - u)``; with ``grad <= 0`` the minimum drops
        the ``|u| - keep`` free groups of smallest ``|grad|``. It is at least ``loss(u)`` (the
        leaps-and-bounds bound) and more through the slopes.
        """
        cut = _exact.binary_cut(self.fn, tuple(allowed))
        free = torch.tensor([g for g in allowed if g not in node.fixed_in], dtype=torch.int64)
        drop = free.numel() - budget
        slopes = -cut.grad[free.to(cut.grad.device)]
        extra = float(torch.topk(slopes, drop, largest=False).values.sum()) if drop > 0 else 0.0
        return safe_bound(cut.value + extra, self.problem.c0)

    def fix_by_reduced_cost(self, node: Node, free: list[int], result, budget: int) -> Node | None:
        """Fix free groups whose opposite value would push the node's linearization bound past the cutoff.

        At the node's relaxed point ``z`` (``result``: its value and gradient) the bound is ``f(z) +
        sum of the budget most negative slopes - grad . z``; forcing group ``g`` out replaces its
        slope by the next one, forcing it in replaces the last chosen one by it. Both are valid
        bounds of the two halves of the node.
        """
        cutoff = self.cutoff()
        if not math.isfinite(cutoff):
            return node
        grad = result.grad
        order = torch.argsort(grad)  # most negative first
        chosen = order[:budget]
        base = result.value + float(grad[chosen].sum()) - float(grad @ result.z)
        next_slope = float(grad[order[budget]]) if budget < grad.numel() else 0.0
        last_chosen = float(grad[order[budget - 1]])
        in_chosen = torch.zeros_like(grad, dtype=torch.bool)
        in_chosen[chosen] = True
        out_bound = torch.where(in_chosen, base - grad + next_slope, torch.full_like(grad, base))
        in_bound = torch.where(in_chosen, torch.full_like(grad, base), base + grad - last_chosen)
        margin = BOUND_MARGIN * max(abs(cutoff), 1.0)
        must_in, must_out = out_bound - margin >= cutoff, in_bound - margin >= cutoff
        if not bool(must_in.any() or must_out.any()):
            return node
        if bool((must_in & must_out).any()):  # both halves pruned: the node is
            self.pruned_floor = min(self.pruned_floor, cutoff - margin)
            return None
        # the discarded halves' bounds are at least the cutoff: they bound what the search no longer sees
        discarded = torch.cat([out_bound[must_in], in_bound[must_out]])
        self.pruned_floor = min(self.pruned_floor, float(discarded.min()) - margin)
        force_in = [free[i] for i in torch.nonzero(must_in).flatten().tolist()]
        force_out = [free[i] for i in torch.nonzero(must_out).flatten().tolist()]
        self.fixed_by_reduced_cost += len(force_in) + len(force_out)
        child = Node(node.bound, node.order, node.fixed_in | set(force_in), node.fixed_out | set(force_out), node.z,
                     node.diagonal)
        if len(child.fixed_in) > self.keep:
            self.pruned_floor = min(self.pruned_floor, cutoff)
            return None
        return self.bound(child)

    def branch(self, node: Node) -> list[Node]:
        """The fixed-in and fixed-out children on the free group whose relaxed value is closest to 1/2
        (measured better than branching on the reduced-cost estimates: 903 against 1998-2625 nodes on
        a 32-neuron MiniLM block)."""
        fixed = node.fixed_in | node.fixed_out
        free = torch.tensor([g for g in range(self.problem.num_groups) if g not in fixed])
        group = int(free[torch.argmin((node.z[free] - 0.5).abs())])
        return [Node(node.bound, next(self.counter), node.fixed_in | {group}, node.fixed_out, node.z, node.diagonal),
                Node(node.bound, next(self.counter), node.fixed_in, node.fixed_out | {group}, node.z, node.diagonal)]

    def run(self, max_nodes: int | None, begin: float) -> SearchResult:
        queue: list[Node] = []
        root = self.bound(Node(-math.inf, next(self.counter), frozenset(), frozenset()))
        root_bound = root.bound if root is not None else self.incumbent.loss
        if root is not None:
            heapq.heappush(queue, root)
        status = "optimal"
        while queue:
            if _exact.time_left(self.deadline) is not None and _exact.time_left(self.deadline) <= 0:
                status = "time_limit"
                break
            if max_nodes is not None and self.nodes >= max_nodes:
                status = "node_limit"
                break
            node = heapq.heappop(queue)
            if node.bound >= self.cutoff():
                self.pruned_floor = min(self.pruned_floor, node.bound)
                continue
            self.nodes += 1
            for child in self.branch(node):
                bounded = self.bound(child)
                if bounded is not None:
                    heapq.heappush(queue, bounded)
        open_bound = min((node.bound for node in queue), default=math.inf)
        lower = min(open_bound, self.pruned_floor, self.incumbent.loss)
        gap = 0.0 if self.incumbent.loss <= 0 else (self.incumbent.loss - lower) / abs(self.incumbent.loss)
        if status == "optimal" and gap > self.rel_gap + 4 * BOUND_MARGIN:  # the bounds' round-off safety margin
            status = "inaccurate"
        return self.result(status, lower, begin, None, root_bound=root_bound, open_nodes=len(queue))

    def result(self, status: str, lower: float, begin: float, note: str | None, **info: Any) -> SearchResult:
        details = {"nodes": self.nodes, "supports_evaluated": len(self.losses), "seconds": time.perf_counter() - begin,
                   "fixed_by_reduced_cost": self.fixed_by_reduced_cost, "shifts_reoptimized": self.reoptimized,
                   "shift": None if self.fn is None else self.fn.shift.kind, **info}
        if note:
            details["note"] = note
        return SearchResult(self.incumbent.support, status=status, lower_bound=min(lower, self.incumbent.loss),
                            info=details)
