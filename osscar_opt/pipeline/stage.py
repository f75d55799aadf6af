"""One stage of the pipeline: calibrate, lower, solve and cut (docs/architecture.md, "The pipeline").

For stage ``i`` (a transformer block, a residual block, a stem) the adapter
(:mod:`osscar_opt.adapters`) gives the module, its structures and the per-batch call arguments.
:class:`StagePruner`:

1. with the ``dense-output`` target, a deep copy of the *dense* stage runs on the dense model's
   stage inputs, recording every consumer's output (the targets) and the dense stage output, in
   one pass;
2. for each structure in order, the *live* stage runs on the already-pruned model's stage inputs;
   the consumer's inputs and the dense targets stream into a float64
   :class:`~osscar_opt.accumulator.StatsAccumulator`; the layer problem is built, the budget
   asks how many groups to keep, the backend solves it, surgery cuts the live stage in place
   (so the next structure is calibrated on the pruned one);
3. the live stage runs once more to advance the pruned inputs; the dense outputs advance the
   dense inputs.

Only one stage's activations are held in memory. Under offload
(:class:`~osscar_opt.pipeline.placement.Placement`) the cached batches are fetched to the compute
device one at a time and the stage is there while it is calibrated, solved and cut.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from osscar_opt.accumulator import SplitAccumulator, StatsAccumulator, choose_damp
from osscar_opt.adapters.base import Stage, StageCall
from osscar_opt.balanced import solve_balanced
from osscar_opt.formulations.structures import Structure
from osscar_opt.formulations.surgery import apply_solution
from osscar_opt.pipeline.placement import Placement
from osscar_opt.pipeline.report import LayerRecord
from osscar_opt.pipeline.settings import HELDOUT_EVERY, SEARCH_DAMP, Settings
from osscar_opt.solving import solve

INCOMPLETE_MARKER = "INCOMPLETE"
"""File in a ``save_problems`` folder while the prune writing it runs; left behind when it was interrupted."""


def start_problem_folder(folder: Path | None) -> None:
    """Create ``folder`` (if any) and mark it incomplete until :func:`finish_problem_folder`."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INCOMPLETE_MARKER).write_text(
        "osscar_opt is writing layer problems here; this file is removed when the prune finishes. If it is "
        "still here, the prune was interrupted and the folder holds the problems of the first stages only.\n"
    )


def finish_problem_folder(folder: Path | None) -> None:
    if folder is not None:
        (folder / INCOMPLETE_MARKER).unlink(missing_ok=True)


def record_io(module: nn.Module, store: list, what: str, placement: Placement | None = None):
    """Forward hook appending the module's input (``what='input'``) or output to ``store`` (on the
    offload device when ``placement`` is given)."""

    def hook(_module, inputs, output):
        value = (inputs[0] if what == "input" else output).detach()
        store.append(value if placement is None else placement.store(value))

    return module.register_forward_hook(hook)


def _token_weights(W: torch.Tensor):
    """Row weights ``1 / ||W x_t||`` for input rows ``x_t`` (the ``token`` objective): every token
    (or output position) counts the same, however large its dense output (massive activations)."""
    W = W.detach().to(torch.float64)

    def weights(rows: torch.Tensor) -> torch.Tensor:
        norms = (rows.to(W.device, torch.float64) @ W.T).norm(dim=1)
        floor = 1e-6 * float(norms.mean()) if float(norms.mean()) > 0 else 1.0
        return 1.0 / norms.clamp_min(floor)

    return weights


def _by_sample(tensor: torch.Tensor, samples: int, name: str) -> torch.Tensor:
    """``tensor`` with the sample index first: layers that see a batch flattened to
    ``(samples * positions, features)`` (OPT's MLP) are reshaped to ``(samples, positions, features)``."""
    if tensor.shape[0] == samples:
        return tensor
    if tensor.dim() == 2 and tensor.shape[0] % samples == 0:
        return tensor.reshape(samples, -1, tensor.shape[1])
    raise RuntimeError(
        f"{name}: its input has shape {tuple(tensor.shape)} for a batch of {samples} samples; "
        "damp='auto' needs layer inputs whose rows can be assigned to samples"
    )


class StagePruner:
    """Prunes one stage given the dense and pruned stage inputs of every batch.

    With an offloading placement the inputs, call arguments, dense targets and outputs are
    held on the offload device and each batch is fetched to the compute device when it is run;
    :meth:`run` holds the stage on the compute device while it is calibrated, solved and cut.
    """

    def __init__(self, settings: Settings, index: int, stage: Stage) -> None:
        self.settings = settings
        self.adapter = settings.adapter
        self.index = index
        self.stage = stage
        self.budget = settings.budget
        self.placement = settings.placement

    def _run(self, hidden: torch.Tensor, call: StageCall, module: nn.Module | None = None) -> torch.Tensor:
        """The stage's (or ``module``'s) output on one cached batch, fetched to the compute device."""
        fetch = self.placement.fetch
        return self.adapter.run_stage(self.stage, fetch(hidden), fetch(call), module)

    def dense_pass(self, dense_in: list[torch.Tensor], calls: list[StageCall]):
        """Targets of every consumer (as rows) and the dense stage outputs, batch by batch; under
        offload a copy of the dense stage is on the compute device for this pass only."""
        dense_module = copy.deepcopy(self.stage.module)
        structures = self.stage.structures(dense_module)
        targets: list[list[torch.Tensor]] = [[] for _ in structures]
        outputs = []
        placement = self.placement if self.placement.offload else None
        handles = [record_io(s.consumer, store, "output", placement)
                   for s, store in zip(structures, targets, strict=True)]
        try:
            with torch.no_grad(), self.placement.stage_on_compute(dense_module, back=False):
                for hidden, call in zip(dense_in, calls, strict=True):
                    outputs.append(self.placement.store(self._run(hidden, call, dense_module).detach()))
        finally:
            for handle in handles:
                handle.remove()
        del dense_module
        return targets, outputs

    def calibrate(self, structure: Structure, pruned_in, calls, targets):
        """Stream the live consumer's inputs (pruned model) and, for ``dense-output``, the dense
        targets into statistics: a :class:`StatsAccumulator`, or a :class:`SplitAccumulator`
        (fit and held-out samples) under ``damp="auto"``. ``targets`` is None for ``pruned-input``."""
        outputs = None if targets is None else structure.out_features
        device = structure.consumer.weight.device
        row_weights = _token_weights(structure.weight()) if self.settings.objective == "token" else None
        if self.settings.split:
            accumulator = SplitAccumulator(structure.in_features, outputs, device, every=HELDOUT_EVERY)
        else:
            accumulator = StatsAccumulator(structure.in_features, outputs, device=device)
        inputs: list[torch.Tensor] = []
        handle = record_io(structure.consumer, inputs, "input")
        try:
            with torch.no_grad():
                for index, (hidden, call) in enumerate(zip(pruned_in, calls, strict=True)):
                    self._run(hidden, call)
                    rows, target = inputs.pop(), None if targets is None else self.placement.fetch(targets[index])
                    if not self.settings.split:
                        x_rows = structure.input_rows(rows)
                        accumulator.add(
                            x_rows, None if target is None else structure.output_rows(target),
                            None if row_weights is None else row_weights(x_rows),
                        )
                        continue
                    accumulator.add(
                        _by_sample(rows, hidden.shape[0], structure.name),
                        None if target is None else _by_sample(target, hidden.shape[0], structure.name),
                        input_rows=structure.input_rows, output_rows=structure.output_rows, row_weights=row_weights,
                    )
        finally:
            handle.remove()
        return accumulator

    def lowering(self, structure: Structure) -> dict:
        """How ``structure``'s consumer bias enters its problem: the current bias, and whether it is re-fit."""
        consumer = structure.consumer
        return {"bias": None if consumer.bias is None else consumer.bias.detach(),
                "refit_bias": self.settings.refit_bias and (consumer.bias is not None or self.adapter.adds_bias)}

    def meta(self, structure: Structure) -> dict[str, str]:
        return {"name": structure.name, "kind": structure.kind, "stage": self.stage.name}

    def build_problem(self, structure: Structure, pruned_in, calls, targets):
        """Calibrate ``structure`` and lower it: ``(problem, accumulator, lowering)``; under
        ``damp="auto"`` the problem is the fit samples' at ridge ``SEARCH_DAMP`` with the held-out
        moments attached."""
        accumulator = self.calibrate(structure, pruned_in, calls, targets)
        W, lowering, meta = structure.weight(), self.lowering(structure), self.meta(structure)
        if self.settings.split:
            problem = accumulator.fit.problem(W, structure.groups, damp=SEARCH_DAMP, meta=meta, **lowering)
            problem.heldout = accumulator.heldout.moments(W, **lowering)
        else:
            problem = accumulator.problem(W, structure.groups, damp=self.settings.damp, meta=meta, **lowering)
        return problem, accumulator, lowering

    def prune_structure(self, position: int, name: str, pruned_in, calls, targets) -> LayerRecord | None:
        """Calibrate the live stage's structure called ``name`` (found by name: positions move once a
        sublayer was emptied; ``position`` is its place in the uncut stage, which names its problem
        file), solve it and cut it; None when the budget leaves it alone or it is gone (the query
        heads of an emptied attention)."""
        structure = next((s for s in self.stage.structures(self.stage.module) if s.name == name), None)
        if structure is None:
            return None
        counted = structure.budget_groups  # q_heads: query heads per KV group
        keep = self.budget.keep(structure.name, structure.kind, counted)
        if keep is None:
            return None
        lowest = 0 if structure.can_empty else 1
        if isinstance(keep, bool) or not isinstance(keep, int) or not lowest <= keep <= counted:
            per_block = " per KV group" if structure.blocks > 1 else ""
            cannot = ("" if structure.can_empty else
                      f"; 0 would remove the sublayer, which the {self.adapter.family} family's forward code cannot do")
            raise ValueError(
                f"budgets: keep for {structure.name} must be an integer in [{lowest}, {counted}]{per_block} "
                f"(or None to leave it alone), got {keep!r}{cannot}"
            )
        if keep == 0:
            return self.empty_structure(structure, pruned_in, calls, targets)
        start = time.perf_counter()
        problem, accumulator, lowering = self.build_problem(structure, pruned_in, calls, targets)
        W, meta = structure.weight(), problem.meta
        total = keep * structure.blocks
        problem.keep = total
        calibration_seconds = time.perf_counter() - start
        if self.settings.save_problems is not None:
            file = f"{self.index:03d}.{position}_{structure.name.replace(':', '.')}.safetensors"  # no ':' in names
            problem.save(self.settings.save_problems / file)
        if structure.blocks > 1:
            solution = solve_balanced(problem, structure.blocks, keep, self.settings.backend,
                                      **self.settings.backend_options)
        else:
            solution = solve(problem, keep, self.settings.backend, **self.settings.backend_options)
        support, heldout_relative = solution.support, None
        if self.settings.split:
            columns = problem.kept_columns(support).to(problem.device)
            damp, errors = choose_damp(accumulator.fit.moments(W, **lowering), problem.heldout, columns)
            heldout_relative = errors[damp] / problem.heldout.y_square if problem.heldout.y_square > 0 else 0.0
            problem = accumulator.merged().problem(W, structure.groups, damp=damp, meta=meta, **lowering)
            loss, weights, bias = problem.evaluate(support)
        else:
            damp = self.settings.damp
            loss, weights, bias = solution.loss, solution.weights, solution.bias
        del accumulator
        apply_solution(structure, support, weights, bias)
        return LayerRecord(
            stage=self.index, name=structure.name, kind=structure.kind, groups=structure.num_groups, keep=total,
            kept=list(support), loss=loss, dense_loss=problem.loss(range(problem.num_groups)),
            relative_loss=loss / problem.c0 if problem.c0 > 0 else 0.0,
            backend=solution.backend, status=solution.status, solve_seconds=solution.seconds,
            calibration_seconds=calibration_seconds, damp=float(damp), heldout_relative_loss=heldout_relative,
            heldout_candidate=solution.info.get("heldout_candidate"),
        )

    def empty_structure(self, structure: Structure, pruned_in, calls, targets) -> LayerRecord:
        """Remove ``structure``'s whole sublayer: its output becomes the re-fit bias (the mean target,
        where the bias is re-fit) or zero; the loss is the layer's whole target energy around it."""
        start = time.perf_counter()
        accumulator = self.calibrate(structure, pruned_in, calls, targets)
        if self.settings.split:  # every row: no support to choose, no ridge to pick
            accumulator, damp = accumulator.merged(), SEARCH_DAMP
        else:
            damp = self.settings.damp
        problem = accumulator.problem(structure.weight(), structure.groups, damp=damp, meta=self.meta(structure),
                                      **self.lowering(structure))
        del accumulator
        calibration_seconds = time.perf_counter() - start
        problem.keep = 0
        loss, weights, bias = problem.evaluate(())
        apply_solution(structure, (), weights, bias)
        return LayerRecord(
            stage=self.index, name=structure.name, kind=structure.kind, groups=structure.num_groups, keep=0,
            kept=[], loss=loss, dense_loss=problem.loss(range(problem.num_groups)),
            relative_loss=loss / problem.c0 if problem.c0 > 0 else 0.0, backend="empty", status="removed",
            solve_seconds=0.0, calibration_seconds=calibration_seconds, damp=float(damp),
            heldout_relative_loss=None, heldout_candidate=None,
        )

    def run(self, dense_in, pruned_in, calls) -> tuple[list[LayerRecord], list | None, list]:
        """Prune this stage; returns its records and the dense and pruned stage outputs.

        Under the ``pruned-input`` target no dense copy runs: ``dense_in`` and the returned dense
        outputs are None. Under offload the stage is on the compute device from its first
        calibration pass to its last forward pass and back on the offload device on return.
        """
        if self.settings.target == "dense-output":
            targets, dense_out = self.dense_pass(dense_in, calls)
        else:
            targets, dense_out = [None] * len(self.stage.structures(self.stage.module)), None
        records = []
        names = [structure.name for structure in self.stage.structures(self.stage.module)]
        with self.placement.stage_on_compute(self.stage.module):
            for position in range(len(targets)):
                record = self.prune_structure(position, names[position], pruned_in, calls, targets[position])
                if record is not None:
                    records.append(record)
                targets[position] = None  # free the targets of this structure
            if not records and pruned_in is dense_in:
                return records, dense_out, dense_out  # nothing pruned yet: both models agree
            with torch.no_grad():
                pruned_out = [
                    self.placement.store(self._run(hidden, call).detach())
                    for hidden, call in zip(pruned_in, calls, strict=True)
                ]
        return records, dense_out, pruned_out
