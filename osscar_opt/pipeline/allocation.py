"""Allocation: every structure's keep for a global cost target (docs/architecture.md, "Targets").

The allocator owns what a :class:`~osscar_opt.budget.CostTarget` needs: each structure's loss curve
(:mod:`osscar_opt.curves`, computed here or as one batch on an executor, :mod:`osscar_opt.batch`),
its cost table (:mod:`osscar_opt.costs`) and the dynamic program that picks the keeps
(:mod:`osscar_opt.allocate`). The pipeline hands it the target once and reads the keeps back from
the target (``target.allocation``).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch

from osscar_opt.adapters.base import Stage, StageCall
from osscar_opt.allocate import Choices, InfeasibleTarget, allocate_with_pairs, interpolate, uniform_keeps
from osscar_opt.allocation_search import search_allocation
from osscar_opt.backends._search import SMALL_PROBLEM_GROUPS
from osscar_opt.balanced import balanced_curve
from osscar_opt.budget import ALIGNED_KINDS
from osscar_opt.costs import LatencyTable, StageCoster, model_cost, wall_timer
from osscar_opt.curves import DEFAULT_CURVE_SWAPS, Curve, keep_grid, loss_curve, normalize
from osscar_opt.formulations.structures import Structure
from osscar_opt.pipeline.search import OutputScorer, Supernet
from osscar_opt.pipeline.settings import Settings
from osscar_opt.pipeline.stage import StagePruner
from osscar_opt.problem import LayerProblem

ACHIEVED_ROUNDS = 9
"""Interleaved rounds the pruned model is timed in against the dense copy (speed-up targets)."""
CURVE_BATCH_BYTES = 1 << 30
"""With a curve executor, queued problems are sent once their ``H`` and ``G`` hold more than this."""


class Allocator:
    """Chooses every structure's keep for a :class:`CostTarget` (docs/architecture.md, "Targets").

    One pass over the dense model computes each structure's loss curve (:mod:`osscar_opt.curves`)
    and cost table (:mod:`osscar_opt.costs`, on the first calibration batch); the keeps come from the
    dynamic program of :mod:`osscar_opt.allocate`. With ``reallocate``, each stage's curves are
    recomputed on the pruned model's inputs just before it is pruned and the budget left is
    allocated again over the stages not yet pruned.

    The curves are computed in this process, or, with an ``executor`` (:mod:`osscar_opt.batch`),
    spread over its workers: the problems of the pass are collected (sent when they hold more than
    ``CURVE_BATCH_BYTES``) and their curves computed as one batch. Under offload each stage runs on
    the compute device for its pass, like :class:`~osscar_opt.pipeline.stage.StagePruner`.
    """

    def __init__(self, settings: Settings, calls: list[StageCall]) -> None:
        assert settings.cost_target is not None, "an Allocator needs a CostTarget budget"
        self.settings = settings
        self.adapter = settings.adapter
        self.target = settings.cost_target
        self.batches = settings.batches
        self.calls = calls
        self.placement = settings.placement
        self.executor = settings.curve_executor
        self.metric = self.target.cost_metric
        self.choices: dict[str, tuple[int, Choices, Curve]] = {}
        self.pairs: dict[tuple[str, str], float] = {}  # interacting structures of one stage -> delta
        self.pending: list[tuple[int, Structure, LayerProblem, list[int], int, list[float], float, float]] = []
        self.pending_bytes = 0
        self.dense_cost = 0.0
        self.dense_model: torch.nn.Module | None = None
        self.latency_tables: dict[str, LatencyTable] = {}  # measured or re-validated in this run, by cache key
        self.capacity = 0.0
        self.seconds = 0.0
        self.supernet: Supernet | None = Supernet() if self.target.search is not None else None
        self.scorer: OutputScorer | None = None
        self.search: dict[str, Any] | None = None

    def stage_choices(self, index: int, stage: Stage, hidden: list[torch.Tensor], costs: bool = True) -> list:
        """Curves (and, with ``costs``, cost tables) of ``stage``'s targeted structures on ``hidden``;
        returns the stage's outputs on ``hidden`` (their energy normalizes the ``stage`` curves).
        With an executor the curves are queued (:meth:`finish_curves` computes them)."""
        fetch = self.placement.fetch
        with self.placement.stage_on_compute(stage.module):
            outputs = [self.placement.store(self.adapter.run_stage(stage, fetch(h), fetch(c)).detach())
                       for h, c in zip(hidden, self.calls, strict=True)]
            samples = sum(int(h.shape[0]) for h in hidden)
            stage_energy = sum(float(y.double().square().sum()) for y in outputs)
            pruner = StagePruner(self.settings, index, stage)
            coster = StageCoster(self.adapter, stage, fetch(hidden[0]), fetch(self.calls[0]), self.metric,
                                 cache=self.target.latency_cache, timer=self.target.latency_timer,
                                 tables=self.latency_tables) if costs else None
            for position, structure in enumerate(stage.structures(stage.module)):
                if structure.kind not in self.target.kinds():
                    continue
                n = structure.budget_groups
                multiple = self.target.multiple_of if structure.kind in ALIGNED_KINDS else 1
                keeps = keep_grid(n, self.target.grid, math.ceil(self.target.min_keep * n), multiple)
                if self.target.allow_empty and structure.can_empty:
                    keeps = [0, *keeps]  # the whole sublayer removed
                table = coster.table(position, keeps) if coster is not None else self.choices[structure.name][1].costs
                problem, _, _ = pruner.build_problem(structure, hidden, self.calls, None)
                swaps = self.target.curve_swaps
                if swaps is None:
                    swaps = DEFAULT_CURVE_SWAPS if n <= SMALL_PROBLEM_GROUPS else 0
                layer_energy = problem.y_square + (problem.heldout.y_square if problem.heldout is not None else 0.0)
                if self.executor is not None:
                    problem = problem.to("cpu")
                    self.pending_bytes += 8 * problem.num_columns * (problem.num_columns + problem.num_outputs)
                self.pending.append((index, structure, problem, keeps, swaps, table, layer_energy / samples,
                                     stage_energy / samples))
                if self.executor is None or self.pending_bytes > CURVE_BATCH_BYTES:
                    self.finish_curves()
            if coster is not None:
                self._measure_interactions(stage, coster)
        return outputs

    def finish_curves(self) -> None:
        """Compute the queued curves (in this process, or as one batch on the executor) and record
        each structure's choices."""
        if not self.pending:
            return
        blocked = [item for item in self.pending if item[1].blocks > 1]  # q_heads: equal counts per KV group
        self.pending = [item for item in self.pending if item[1].blocks == 1] + blocked
        if self.executor is None or len(blocked) == len(self.pending):
            curves = [loss_curve(problem, keeps, swaps=swaps, name=structure.name, kind=structure.kind)
                      if structure.blocks == 1 else
                      balanced_curve(problem, structure.blocks, keeps, name=structure.name, kind=structure.kind)
                      for _, structure, problem, keeps, swaps, *_ in self.pending]
        else:
            from osscar_opt.batch import curves_many

            free = self.pending[:len(self.pending) - len(blocked)]
            rows = curves_many([item[2] for item in free], [item[3] for item in free],
                               [item[4] for item in free], executor=self.executor)
            curves = [Curve(name=structure.name, kind=structure.kind, num_groups=problem.num_groups,
                            keeps=row["keeps"], relative=row["relative"],
                            supports=[tuple(s) for s in row["supports"]], heldout=row["heldout"])
                      for (_, structure, problem, *_), row in zip(free, rows, strict=True)]
            curves += [balanced_curve(problem, structure.blocks, keeps, name=structure.name, kind=structure.kind)
                       for _, structure, problem, keeps, *_ in blocked]
        for (index, structure, problem, keeps, _, table, layer_energy, stage_energy), curve in zip(
                self.pending, curves, strict=True):
            normalize(curve, self.target.normalize, layer_energy=layer_energy, stage_energy=stage_energy)
            if self.supernet is not None:
                self.supernet.add(structure, problem, curve.keeps, curve.supports)
            self.choices[structure.name] = (index, Choices(structure.name, structure.kind, keeps, curve.losses,
                                                           table), curve)
        self.pending, self.pending_bytes = [], 0

    def _measure_interactions(self, stage: Stage, coster: StageCoster) -> None:
        """Bilinear cost terms between the targeted structures of one stage (exact MACs/params)."""
        targeted = [(position, s.name) for position, s in enumerate(stage.structures(stage.module))
                    if s.kind in self.target.kinds()]
        for i, (first, first_name) in enumerate(targeted):
            for second, second_name in targeted[i + 1:]:
                delta = coster.interaction(first, second)
                if delta != 0.0:
                    self.pairs[(first_name, second_name)] = delta

    def cost_of(self, keep: dict[str, int]) -> float:
        """Predicted cost change of the structures in ``keep`` (tables plus interaction terms)."""
        cost = sum(interpolate(self.choices[name][1].keeps, self.choices[name][1].costs, k) for name, k in keep.items())
        for (first, second), delta in self.pairs.items():
            if first in keep and second in keep:
                cost += delta * (keep[first] - self.choices[first][1].keeps[-1]) * (
                    keep[second] - self.choices[second][1].keeps[-1])
        return cost

    def initial(self, dense_in: list[torch.Tensor], progress: bool) -> None:
        """Curves and costs of every stage on the dense model, then the allocation."""
        from tqdm.auto import tqdm

        start = time.perf_counter()
        self.target.allocation = None
        model = self.adapter.model
        if self.metric == "latency":  # the pruned model is timed against it, interleaved, at the end
            self.dense_model = copy.deepcopy(model)
        self.dense_cost = model_cost(model, self.batches[0], self.metric, self.target.latency_timer)
        self.capacity = self.target.capacity(self.dense_cost)
        hidden = dense_in
        stages = self.adapter.stages()
        with torch.no_grad():
            for index in tqdm(range(len(stages)), desc="loss curves", unit="stage", disable=not progress):
                hidden = self.stage_choices(index, stages[index], hidden)
            self.finish_curves()
        if not self.choices:
            raise ValueError(f"budgets: the target prunes {sorted(self.target.kinds())}, which this model lacks")
        self._allocate(0)
        if self.supernet is not None:
            self._search(progress)
        self.seconds += time.perf_counter() - start

    def _search(self, progress: bool) -> None:
        """Search keeps at the same cost, scored on the model's output (:mod:`osscar_opt.allocation_search`),
        from the dynamic program's allocation; the model is dense again afterwards."""
        adapter, supernet = self.adapter, self.supernet
        model = adapter.model
        if hasattr(adapter, "model_inputs"):  # transformers: token ids, every position attended
            def forward(batch: torch.Tensor) -> Any:
                return model(**adapter.model_inputs(batch))
        else:
            forward = model
        self.scorer = OutputScorer(forward, self.settings.search_batches)

        def score(keep: dict[str, int], share: float) -> tuple[float, float]:
            supernet.assemble(keep)
            return self.scorer.score(share)

        start = dict(self.target.allocation)
        choices = [choices for _, choices, _ in self.choices.values()]
        starts: dict[str, float] = {}
        try:
            with torch.no_grad():
                start, starts = self._search_start(start, choices, score)
                result = search_allocation(choices, start, self.cost_of, self.capacity - self.dense_cost, score,
                                           self.target.search, progress=progress)
        finally:
            supernet.restore()
        self.target.allocation = dict(result.keep)
        self.search = {**self.target.search.to_dict(), **result.to_dict(), "metric": self.scorer.metric,
                       "start_scores": starts,
                       "samples": self.scorer.samples, "supernet_bytes": supernet.bytes,
                       "start_fraction": (self.dense_cost + self.cost_of(start)) / self.dense_cost,
                       "fraction": (self.dense_cost + self.cost_of(result.keep)) / self.dense_cost}

    def _search_start(self, allocation: dict[str, int], choices: list[Choices],
                      score) -> tuple[dict[str, int], dict[str, float]]:
        """Where the search starts: the program's allocation; under ``allow_empty``, the better scored
        (on all the search's samples) of the program's allocations with and without keeps of 0 (the
        summed layer losses can price a whole sublayer's removal far from what it does to the
        model's output). Returns the start and the scores of the starts compared (empty: none)."""
        if not any(0 in c.keeps for c in choices):
            return allocation, {}
        positive = [Choices(c.name, c.kind, c.keeps[1:], c.losses[1:], c.costs[1:]) if c.keeps[0] == 0 else c
                    for c in choices]
        try:
            widths_only = allocate_with_pairs(positive, self.capacity - self.dense_cost, self.pairs)
        except InfeasibleTarget:  # reachable only by removing sublayers
            return allocation, {}
        if widths_only == allocation:
            return allocation, {}
        scores = {"program": score(allocation, 1.0)[0], "program_without_empty": score(widths_only, 1.0)[0]}
        return (widths_only if scores["program_without_empty"] < scores["program"] else allocation), scores

    def reallocate(self, index: int, stage: Stage, pruned_in: list[torch.Tensor]) -> None:
        """Before stage ``index`` is pruned: its curves on ``pruned_in``, then the budget left over
        the stages from ``index`` on."""
        if not any(stage_index == index for stage_index, _, _ in self.choices.values()):
            return
        start = time.perf_counter()
        with torch.no_grad():
            self.stage_choices(index, stage, pruned_in, costs=False)
            self.finish_curves()
        self._allocate(index)
        self.seconds += time.perf_counter() - start

    def _allocate(self, first_stage: int) -> None:
        allocation = dict(self.target.allocation or {})
        spent = self.cost_of({name: allocation[name] for name, (stage, _, _) in self.choices.items()
                              if stage < first_stage})
        open_choices = [choices for stage, choices, _ in self.choices.values() if stage >= first_stage]
        capacity = self.capacity - self.dense_cost - spent
        try:
            if self.target.mode == "uniform":
                allocation.update(uniform_keeps(open_choices, capacity, self.target.grid, self.cost_of))
            else:
                allocation.update(allocate_with_pairs(open_choices, capacity, self.pairs))
        except InfeasibleTarget:
            cheapest = self.cost_of({c.name: c.keeps[0] for c in open_choices})
            floor = (self.dense_cost + spent + cheapest) / self.dense_cost
            raise ValueError(self._infeasible_message(floor)) from None
        self.target.allocation = allocation

    def _infeasible_message(self, floor: float) -> str:
        target = self.target
        reached = f"{floor:.3f} of its dense {self.metric}" if target.metric != "speedup" else (
            f"a speed-up of {1 / floor:.2f}x")
        kinds = sorted({choices.kind for _, choices, _ in self.choices.values()})
        aligned = (f", neurons and channels in multiples of {target.multiple_of}" if target.multiple_of > 1 else "")
        return (
            f"target {target.metric}={target.value:g} cannot be met: with every prunable structure of kinds {kinds} "
            f"at its minimum keep (min_keep={target.min_keep:g}, "
            f"{'0 where a sublayer can be emptied' if target.allow_empty else 'at least one group each'}{aligned}) "
            "the model reaches "
            "only "
            f"{reached}; the rest (embeddings, output layers, structures of other kinds) is not pruned. "
            "Relax the target, lower min_keep" + (" or multiple_of" if target.multiple_of > 1 else "")
            + " or prune more kinds."
        )

    def predicted_cost(self) -> float:
        allocation = self.target.allocation or {}
        return self.dense_cost + self.cost_of({name: allocation[name] for name in self.choices})

    def at_floor(self) -> list[str]:
        """The structures the allocation left at their smallest allowed keep above 0."""
        allocation = self.target.allocation or {}
        return [name for name, (_, choices, _) in self.choices.items()
                if allocation.get(name) == next(k for k in choices.keeps if k > 0)]

    def emptied(self) -> list[str]:
        """The structures whose whole sublayer the allocation removes (keep 0, ``allow_empty``)."""
        allocation = self.target.allocation or {}
        return [name for name in self.choices if allocation.get(name) == 0]

    def achieved(self) -> dict[str, Any]:
        """The pruned model's cost on the calibration batch and whether it meets the target.

        MACs and parameters are exact: met when at most the capacity. Latency is timed against
        the dense copy, interleaved (:func:`osscar_opt.evaluate.compare_latency`): met unless even
        the best round's speed-up is below the target (a miss beyond the measured spread)."""
        model = self.adapter.model
        if self.metric != "latency":
            cost = model_cost(model, self.batches[0], self.metric)
            fraction = cost / self.dense_cost if self.dense_cost else 1.0
            result = {"achieved_cost": cost, "achieved_fraction": fraction,
                      "target_met": cost <= self.capacity * (1 + 1e-9)}
            if not result["target_met"]:
                result["missed"] = (f"target {self.metric} {self.target.value:g} missed: the pruned model has "
                                    f"{fraction:.4f} of its dense {self.metric}")
            return result
        comparison = self._time_against_dense()
        low, high = comparison.speedup_range
        result = {"achieved_cost": comparison.pruned_ms, "achieved_fraction": 1 / comparison.speedup,
                  "achieved_speedup": comparison.speedup, "achieved_speedup_range": [low, high],
                  "latency": comparison.to_dict(), "target_met": high >= self.target.value}
        if not result["target_met"]:
            predicted = self.dense_cost / self.predicted_cost()
            result["missed"] = (
                f"target speed-up {self.target.value:.2f}x missed: measured {comparison.speedup:.2f}x (range "
                f"{low:.2f}-{high:.2f}x over {comparison.rounds} interleaved rounds against the dense model) where "
                f"the latency tables predicted {predicted:.2f}x"
            )
        return result

    def _time_against_dense(self):
        from osscar_opt.evaluate import compare_latency

        model, dense, batch = self.adapter.model, self.dense_model, self.batches[0]
        timer = self.target.latency_timer or wall_timer
        calls = [lambda: timer(dense, lambda: dense(batch)), lambda: timer(model, lambda: model(batch))]
        comparison = compare_latency(*calls, rounds=ACHIEVED_ROUNDS, measure=lambda call: call())
        self.dense_model = None  # the copy is not needed any more
        return comparison

    def summary(self, achieved: bool = False) -> dict[str, Any]:
        """The allocation for the report; with ``achieved``, the pruned model's cost measured on the
        same batch (:meth:`achieved`) and the structures left at their smallest keep."""
        predicted = self.predicted_cost()
        measured = {**self.achieved(), "at_floor": self.at_floor(), "emptied": self.emptied()} if achieved else {}
        search = None if self.search is None else dict(self.search)
        if achieved and search is not None:  # the pruned model (re-fit on its own inputs) on the same samples
            search["pruned_score"] = self.scorer.score(1.0)[0]
        return {
            **measured, **self.target.to_dict(), "metric": self.metric, "dense_cost": self.dense_cost,
            "capacity": self.capacity, "predicted_cost": predicted,
            "predicted_fraction": predicted / self.dense_cost if self.dense_cost else 1.0,
            "keep": dict(self.target.allocation or {}), "seconds": self.seconds, "search": search,
            "curves": [
                {**curve.to_dict(), "stage": stage, "costs": choices.costs}
                for stage, choices, curve in self.choices.values()
            ],
        }
