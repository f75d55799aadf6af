"""The one pruning pipeline: calibrate, lower, solve and cut, one stage at a time, for every family.

For stage ``i`` (a transformer block, a residual block, a stem) the adapter
(:mod:`osscar_opt.adapters`) gives the module, its structures and the per-batch call arguments.
The loop (docs/architecture.md, "The pipeline"):

1. a deep copy of the *dense* stage runs on the dense model's stage inputs, recording every
   consumer's output (the targets) and the dense stage output, in one pass;
2. for each structure in order, the *live* stage runs on the already-pruned model's stage inputs;
   the consumer's inputs and the dense targets stream into a float64
   :class:`~osscar_opt.accumulator.StatsAccumulator`; the layer problem is built, the budget
   asks how many groups to keep, the backend solves it, surgery cuts the live stage in place
   (so the next structure is calibrated on the pruned one);
3. the live stage runs once more to advance the pruned inputs; the dense outputs advance the
   dense inputs.

Only one stage's activations are held in memory. The model is pruned in place.

With ``offload=True`` (:class:`_Placement`) the model and the cached activations (stage inputs,
call arguments, dense targets) stay on the offload device (where the model is, normally the CPU);
each stage moves to the compute device just for its own passes, solves and cuts, and goes back
pruned; the cached tensors move to the compute device one batch at a time, when used.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osscar_opt.accumulator import SplitAccumulator, StatsAccumulator, choose_damp
from osscar_opt.adapters.base import ModelAdapter, Stage, StageCall, map_tensors, model_device
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.allocate import Choices, InfeasibleTarget, allocate_with_pairs, interpolate, uniform_keeps
from osscar_opt.backends._search import SMALL_PROBLEM_GROUPS
from osscar_opt.budget import Budget, CostTarget, as_budget
from osscar_opt.costs import StageCoster, model_cost
from osscar_opt.curves import DEFAULT_CURVE_SWAPS, Curve, keep_grid, loss_curve, normalize
from osscar_opt.formulations.structures import Structure
from osscar_opt.formulations.surgery import apply_solution
from osscar_opt.problem import LayerProblem
from osscar_opt.solving import solve


@dataclass
class LayerRecord:
    """What happened to one consumer layer (one row of the JSON report).

    Losses are the layer problem's (squared reconstruction error plus ridge term, summed over
    calibration rows); ``relative_loss`` is ``loss / c0`` (``c0``: the loss of keeping nothing).
    ``damp`` is the ridge the kept weights were re-fit with. Under ``damp="auto"``,
    ``heldout_relative_loss`` is the held-out samples' error of weights fit on the other samples,
    over the held-out error of keeping nothing, and ``heldout_candidate`` names the local-search
    candidate the held-out rows chose (None for backends with one candidate).
    """

    stage: int
    name: str
    kind: str
    groups: int
    keep: int
    kept: list[int]
    loss: float
    dense_loss: float
    relative_loss: float
    backend: str
    status: str
    solve_seconds: float
    calibration_seconds: float
    damp: float = 0.0
    heldout_relative_loss: float | None = None
    heldout_candidate: str | None = None


@dataclass
class PruneReport:
    """Per-layer records of a :func:`prune` run, its settings and total wall time (seconds)."""

    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "seconds": self.seconds, "layers": [asdict(r) for r in self.layers]}


INCOMPLETE = "incomplete"
"""``model.osscar_state`` after :func:`prune` failed part-way: some stages are cut in place, the
rest are not; :func:`osscar_opt.save_pruned` refuses such a model (reload the dense one and prune
again)."""

INCOMPLETE_MARKER = "INCOMPLETE"
"""File in a ``save_problems`` folder while the prune writing it runs; left behind when it was interrupted."""

TARGETS = ("pruned-input", "dense-output")
OBJECTIVES = ("energy", "token")
DEFAULT_OBJECTIVE = "energy"
DEFAULT_DAMP: float | str = "auto"
# damp="auto": every HELDOUT_EVERY-th calibration sample is held out; the support is searched at
# ridge SEARCH_DAMP, the re-fit ridge is chosen from accumulator.DAMP_GRID on the held-out samples.
HELDOUT_EVERY = 4
SEARCH_DAMP = 1e-2


@dataclass
class _Options:
    backend: str
    backend_options: dict[str, Any]
    refit_bias: bool
    damp: float | str
    save_problems: Path | None
    target: str = "pruned-input"
    objective: str = DEFAULT_OBJECTIVE

    @property
    def split(self) -> bool:
        return self.damp == "auto"


class _Placement:
    """Where the stages run (``compute``) and where the model and the cached activations live
    (``storage``, the offload device) during a :func:`prune` run.

    Without ``offload`` every method returns its argument (everything stays where the model is).
    With it, :meth:`stage_on_compute` holds one stage on the compute device, :meth:`fetch` brings a
    cached tensor (or a :class:`StageCall`) there for one use and :meth:`store` puts a result back
    on the offload device. Tensors and modules move through :meth:`_to_compute` /
    :meth:`_to_storage` only (``tensor.to(device)``; modules through ``Module._apply``, as
    ``Module.to`` does).
    """

    def __init__(self, compute: torch.device, storage: torch.device, offload: bool) -> None:
        self.compute = compute
        self.storage = storage
        self.offload = offload

    def _to_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.compute)

    def _to_storage(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.storage)

    def fetch(self, value: Any) -> Any:
        """``value`` (a tensor, a StageCall, tuples / lists / dicts of them) on the compute device."""
        return map_tensors(value, self._to_compute) if self.offload else value

    def store(self, value: Any) -> Any:
        """``value`` on the offload device."""
        return map_tensors(value, self._to_storage) if self.offload else value

    @contextlib.contextmanager
    def stage_on_compute(self, module: nn.Module, back: bool = True):
        """``module`` (a stage, cut in place inside the block) on the compute device; on leaving,
        back on the offload device (also after an error); ``back=False`` for a throw-away copy."""
        if not self.offload:
            yield module
            return
        module._apply(self._to_compute)
        try:
            yield module
        finally:
            if back:
                module._apply(self._to_storage)

    @contextlib.contextmanager
    def outside_stages_on_compute(self, adapter: ModelAdapter):
        """The parameters and buffers of no stage (embeddings, masks' buffers, head) on the compute
        device, for :meth:`ModelAdapter.stage_inputs`; back on the offload device after."""
        if not self.offload:
            yield
            return
        modules = adapter.outside_stages()
        for module in modules:
            module._apply(self._to_compute, recurse=False)
        try:
            yield
        finally:
            for module in modules:
                module._apply(self._to_storage, recurse=False)


def resolve_device(value: Any, name: str = "device") -> torch.device:
    """``value`` (a ``torch.device`` or a name such as ``"cuda:0"``) as a device this machine has,
    with the CUDA index made explicit; anything else is a ValueError naming ``name``."""
    shown = repr(str(value)) if isinstance(value, torch.device) else repr(value)
    if isinstance(value, str):
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError(f"{name}: {shown} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    elif isinstance(value, torch.device):
        device = value
    else:
        raise ValueError(f"{name}: expected a torch.device or a device name such as 'cuda:0', got "
                         f"{type(value).__name__} {shown}")
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "meta":
        raise ValueError(f"{name}: {shown} holds no data; expected a device such as 'cpu' or 'cuda'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {shown}: no CUDA GPU is available on this machine; use 'cpu'")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {shown}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             "numbered from 0")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: {shown}: MPS is not available on this machine; use 'cpu'")
    return device


def _placement(model: nn.Module, device: Any, offload: Any) -> _Placement:
    """Check ``offload`` and ``device`` (before any work) and say where things go: the offload
    device is the model's; the compute device ``device`` (default: the model's)."""
    if not isinstance(offload, bool):
        raise ValueError(f"offload: expected True or False, got {offload!r}")
    storage = resolve_device(model_device(model), "model")
    compute = storage if device is None else resolve_device(device)
    if not offload and compute != storage:
        raise ValueError(
            f"device: the model is on {storage} and offload is off, so prune runs where the model is; move the "
            f"model first (model.to({str(compute)!r})) or pass offload=True to keep it on {storage} and move one "
            f"stage at a time to {compute}"
        )
    return _Placement(compute, storage, offload)


def _record_io(module: nn.Module, store: list, what: str, placement: _Placement | None = None):
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


class _StagePruner:
    """Prunes one stage given the dense and pruned stage inputs of every batch.

    With an offloading ``placement`` the inputs, call arguments, dense targets and outputs are
    held on the offload device and each batch is fetched to the compute device when it is run;
    :meth:`run` holds the stage on the compute device while it is calibrated, solved and cut.
    """

    def __init__(self, adapter: ModelAdapter, index: int, stage: Stage, budget: Budget, options: _Options,
                 placement: _Placement | None = None) -> None:
        self.adapter = adapter
        self.index = index
        self.stage = stage
        self.budget = budget
        self.options = options
        self.placement = placement if placement is not None else _Placement(torch.device("cpu"),
                                                                             torch.device("cpu"), False)

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
        handles = [_record_io(s.consumer, store, "output", placement)
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
        row_weights = _token_weights(structure.weight()) if self.options.objective == "token" else None
        if self.options.split:
            accumulator = SplitAccumulator(structure.in_features, outputs, device, every=HELDOUT_EVERY)
        else:
            accumulator = StatsAccumulator(structure.in_features, outputs, device=device)
        inputs: list[torch.Tensor] = []
        handle = _record_io(structure.consumer, inputs, "input")
        try:
            with torch.no_grad():
                for index, (hidden, call) in enumerate(zip(pruned_in, calls, strict=True)):
                    self._run(hidden, call)
                    rows, target = inputs.pop(), None if targets is None else self.placement.fetch(targets[index])
                    if not self.options.split:
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

    def build_problem(self, structure: Structure, pruned_in, calls, targets):
        """Calibrate ``structure`` and lower it: ``(problem, accumulator, lowering)``; under
        ``damp="auto"`` the problem is the fit samples' at ridge ``SEARCH_DAMP`` with the held-out
        moments attached."""
        consumer = structure.consumer
        accumulator = self.calibrate(structure, pruned_in, calls, targets)
        W = structure.weight()
        lowering = {
            "bias": None if consumer.bias is None else consumer.bias.detach(),
            "refit_bias": self.options.refit_bias and (consumer.bias is not None or self.adapter.adds_bias),
        }
        meta = {"name": structure.name, "kind": structure.kind, "stage": self.stage.name}
        if self.options.split:
            problem = accumulator.fit.problem(W, structure.groups, damp=SEARCH_DAMP, meta=meta, **lowering)
            problem.heldout = accumulator.heldout.moments(W, **lowering)
        else:
            problem = accumulator.problem(W, structure.groups, damp=self.options.damp, meta=meta, **lowering)
        return problem, accumulator, lowering

    def prune_structure(self, position: int, pruned_in, calls, targets) -> LayerRecord | None:
        """Calibrate the live stage's structure at ``position``, solve it and cut it."""
        structure = self.stage.structures(self.stage.module)[position]
        keep = self.budget.keep(structure.name, structure.kind, structure.num_groups)
        if keep is None:
            return None
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= structure.num_groups:
            raise ValueError(
                f"budgets: keep for {structure.name} must be an integer in [1, {structure.num_groups}] "
                f"(or None to leave it alone), got {keep!r}"
            )
        start = time.perf_counter()
        problem, accumulator, lowering = self.build_problem(structure, pruned_in, calls, targets)
        W, meta = structure.weight(), problem.meta
        problem.keep = keep
        calibration_seconds = time.perf_counter() - start
        if self.options.save_problems is not None:
            problem.save(self.options.save_problems / f"{self.index:03d}.{position}_{structure.name}.safetensors")
        solution = solve(problem, keep, self.options.backend, **self.options.backend_options)
        support, heldout_relative = solution.support, None
        if self.options.split:
            columns = problem.kept_columns(support).to(problem.device)
            damp, errors = choose_damp(accumulator.fit.moments(W, **lowering), problem.heldout, columns)
            heldout_relative = errors[damp] / problem.heldout.y_square if problem.heldout.y_square > 0 else 0.0
            problem = accumulator.merged().problem(W, structure.groups, damp=damp, meta=meta, **lowering)
            loss, weights, bias = problem.evaluate(support)
        else:
            damp = self.options.damp
            loss, weights, bias = solution.loss, solution.weights, solution.bias
        del accumulator
        apply_solution(structure, support, weights, bias)
        return LayerRecord(
            stage=self.index, name=structure.name, kind=structure.kind, groups=structure.num_groups, keep=keep,
            kept=list(support), loss=loss, dense_loss=problem.loss(range(problem.num_groups)),
            relative_loss=loss / problem.c0 if problem.c0 > 0 else 0.0,
            backend=solution.backend, status=solution.status, solve_seconds=solution.seconds,
            calibration_seconds=calibration_seconds, damp=float(damp), heldout_relative_loss=heldout_relative,
            heldout_candidate=solution.info.get("heldout_candidate"),
        )

    def run(self, dense_in, pruned_in, calls) -> tuple[list[LayerRecord], list | None, list]:
        """Prune this stage; returns its records and the dense and pruned stage outputs.

        Under the ``pruned-input`` target no dense copy runs: ``dense_in`` and the returned dense
        outputs are None. Under offload the stage is on the compute device from its first
        calibration pass to its last forward pass and back on the offload device on return.
        """
        if self.options.target == "dense-output":
            targets, dense_out = self.dense_pass(dense_in, calls)
        else:
            targets, dense_out = [None] * len(self.stage.structures(self.stage.module)), None
        records = []
        with self.placement.stage_on_compute(self.stage.module):
            for position in range(len(targets)):
                record = self.prune_structure(position, pruned_in, calls, targets[position])
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


CURVE_BATCH_BYTES = 1 << 30
"""With a curve executor, queued problems are sent once their ``H`` and ``G`` hold more than this."""


class _Allocator:
    """Chooses every structure's keep for a :class:`CostTarget` (docs/architecture.md, "Targets").

    One pass over the dense model computes each structure's loss curve (:mod:`osscar_opt.curves`)
    and cost table (:mod:`osscar_opt.costs`, on the first calibration batch); the keeps come from the
    dynamic program of :mod:`osscar_opt.allocate`. With ``reallocate``, each stage's curves are
    recomputed on the pruned model's inputs just before it is pruned and the budget left is
    allocated again over the stages not yet pruned.

    The curves are computed in this process, or, with an ``executor`` (:mod:`osscar_opt.batch`),
    spread over its workers: the problems of the pass are collected (sent when they hold more than
    ``CURVE_BATCH_BYTES``) and their curves computed as one batch. Under offload each stage runs on
    the compute device for its pass, like :class:`_StagePruner`.
    """

    def __init__(self, adapter: ModelAdapter, target: CostTarget, options: _Options, batches, calls,
                 placement: _Placement | None = None, executor: Any = None) -> None:
        self.adapter = adapter
        self.target = target
        self.options = options
        self.batches = batches
        self.calls = calls
        self.placement = placement if placement is not None else _Placement(torch.device("cpu"),
                                                                             torch.device("cpu"), False)
        self.executor = executor
        self.metric = target.cost_metric
        self.choices: dict[str, tuple[int, Choices, Curve]] = {}
        self.pairs: dict[tuple[str, str], float] = {}  # interacting structures of one stage -> delta
        self.pending: list[tuple[int, Structure, LayerProblem, list[int], int, list[float], float, float]] = []
        self.pending_bytes = 0
        self.dense_cost = 0.0
        self.capacity = 0.0
        self.seconds = 0.0

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
            pruner = _StagePruner(self.adapter, index, stage, self.target, self.options, self.placement)
            coster = StageCoster(self.adapter, stage, fetch(hidden[0]), fetch(self.calls[0]), self.metric,
                                 cache=self.target.latency_cache) if costs else None
            for position, structure in enumerate(stage.structures(stage.module)):
                if structure.kind not in self.target.kinds():
                    continue
                n = structure.num_groups
                keeps = keep_grid(n, self.target.grid, math.ceil(self.target.min_keep * n))
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
        if self.executor is None:
            curves = [loss_curve(problem, keeps, swaps=swaps, name=structure.name, kind=structure.kind)
                      for _, structure, problem, keeps, swaps, *_ in self.pending]
        else:
            from osscar_opt.batch import curves_many

            rows = curves_many([item[2] for item in self.pending], [item[3] for item in self.pending],
                               [item[4] for item in self.pending], executor=self.executor)
            curves = [Curve(name=structure.name, kind=structure.kind, num_groups=problem.num_groups,
                            keeps=row["keeps"], relative=row["relative"],
                            supports=[tuple(s) for s in row["supports"]], heldout=row["heldout"])
                      for (_, structure, problem, *_), row in zip(self.pending, rows, strict=True)]
        for (index, structure, _, keeps, _, table, layer_energy, stage_energy), curve in zip(self.pending, curves,
                                                                                            strict=True):
            normalize(curve, self.target.normalize, layer_energy=layer_energy, stage_energy=stage_energy)
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
        self.dense_cost = model_cost(self.adapter.model, self.batches[0], self.metric)
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
        self.seconds += time.perf_counter() - start

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
        return (
            f"target {target.metric}={target.value:g} cannot be met: with every prunable structure of kinds {kinds} "
            f"at its minimum keep (min_keep={target.min_keep:g}, at least one group each) the model reaches only "
            f"{reached}; the rest (embeddings, output layers, structures of other kinds) is not pruned. "
            "Relax the target, lower min_keep or prune more kinds."
        )

    def predicted_cost(self) -> float:
        allocation = self.target.allocation or {}
        return self.dense_cost + self.cost_of({name: allocation[name] for name in self.choices})

    def summary(self, achieved: bool = False) -> dict[str, Any]:
        """The allocation for the report; with ``achieved``, the pruned model's cost measured on the
        same batch (``achieved_cost``, ``achieved_fraction``)."""
        predicted = self.predicted_cost()
        measured = {}
        if achieved:
            cost = model_cost(self.adapter.model, self.batches[0], self.metric)
            measured = {"achieved_cost": cost, "achieved_fraction": cost / self.dense_cost if self.dense_cost else 1.0}
        return {
            **measured, **self.target.to_dict(), "metric": self.metric, "dense_cost": self.dense_cost,
            "capacity": self.capacity, "predicted_cost": predicted,
            "predicted_fraction": predicted / self.dense_cost if self.dense_cost else 1.0,
            "keep": dict(self.target.allocation or {}), "seconds": self.seconds,
            "curves": [
                {**curve.to_dict(), "stage": stage, "costs": choices.costs}
                for stage, choices, curve in self.choices.values()
            ],
        }


@dataclass
class Plan:
    """What a :func:`prune` run will do and roughly cost, known before the first structure is solved.

    ``problems`` counts the structures of the kinds the budget names (at most that many layer
    problems: a budget may still leave some alone).

    ``rows``: calibration rows per layer problem (tokens, or output positions of the first conv);
    ``activation_bytes``: the stage inputs held in memory (twice for ``dense-output``);
    ``problem_bytes``: the float64 statistics of the largest problem (``H``, ``X^T X`` and, under
    ``damp="auto"``, the held-out copy); ``forward_seconds``: the calibration forward passes,
    extrapolated from one timed pass of the first stage (solver time not included).
    """

    samples: int
    sample_shape: list[int]
    tokens: bool
    stages: int
    problems: int
    largest_columns: int
    activation_bytes: int
    problem_bytes: int
    forward_seconds: float

    def describe(self) -> str:
        shape = " x ".join(str(d) for d in self.sample_shape)
        if self.tokens:
            data = f"{self.samples} x {shape} = {self.samples * _product(self.sample_shape):,} calibration tokens"
        else:
            data = f"{self.samples} calibration images of {shape}"
        return (
            f"plan: {data}, {self.stages} stages, up to {self.problems} layer problems (largest {self.largest_columns} "
            f"columns); memory about {_gib(self.activation_bytes + self.problem_bytes)} "
            f"(activations {_gib(self.activation_bytes)}, largest problem {_gib(self.problem_bytes)}); "
            f"forward passes about {self.forward_seconds:.0f} s plus solver time"
        )


def _product(values) -> int:
    total = 1
    for value in values:
        total *= int(value)
    return total


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**28 else f"{count / 2**20:.0f} MiB"


def _plan(adapter: ModelAdapter, budget: Budget, options: _Options, batches, dense_in, calls,
          placement: _Placement | None = None) -> Plan:
    """Count the problems, size the memory and time one pass of the first stage (on the compute
    device; ``activation_bytes`` are held on the offload device under offload)."""
    stages = adapter.stages()
    problems, largest = 0, 0
    kinds = set(budget.kinds())  # the budget's keep() is asked only when a structure is reached
    for stage in stages:
        for structure in stage.structures(stage.module):
            if structure.kind in kinds:
                problems += 1
                largest = max(largest, structure.in_features + 1)
    copies = 2 if options.target == "dense-output" else 1
    activation_bytes = copies * sum(t.numel() * t.element_size() for t in dense_in)
    problem_bytes = (3 if options.split else 2) * 8 * largest * largest
    placement = placement if placement is not None else _Placement(torch.device("cpu"), torch.device("cpu"), False)
    with torch.no_grad(), placement.stage_on_compute(stages[0].module):
        hidden, call = placement.fetch(dense_in[0]), placement.fetch(calls[0])
        start = time.perf_counter()
        adapter.run_stage(stages[0], hidden, call)
        one_pass = time.perf_counter() - start
    passes_per_stage = (problems / max(len(stages), 1) + 1) + (1 if options.target == "dense-output" else 0)
    return Plan(
        samples=sum(int(b.shape[0]) for b in batches), sample_shape=list(batches[0].shape[1:]),
        tokens=not batches[0].is_floating_point(), stages=len(stages), problems=problems,
        largest_columns=max(largest - 1, 0),
        activation_bytes=activation_bytes, problem_bytes=problem_bytes,
        forward_seconds=one_pass * len(batches) * len(stages) * passes_per_stage,
    )


def _check_kinds(adapter: ModelAdapter, budget: Budget) -> None:
    """Refuse a budget that prunes none of the model's structure kinds, before any forward pass."""
    present = {structure.kind for structure in adapter.structures()}
    wanted = set(budget.kinds())
    if not wanted:
        raise ValueError(
            f"budgets: {budget!r} prunes nothing; give a sparsity above 0 for some of {sorted(present)}, e.g. "
            + "{" + ", ".join(f"{kind!r}: 0.25" for kind in sorted(present)) + "}"
        )
    if not wanted & present:
        raise ValueError(
            f"budgets: prune {sorted(wanted)}, but this {adapter.architecture} model has only {sorted(present)}"
        )


def prune(
    model: nn.Module,
    calibration: Any,
    budgets: Budget | Mapping[str, float],
    *,
    backend: str = "local-search",
    backend_options: Mapping[str, Any] | None = None,
    refit_bias: bool = False,
    damp: float | str = DEFAULT_DAMP,
    target: str | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    batch_size: int = 8,
    save_problems: str | Path | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    offload: bool = False,
    executor: Any = None,
    workers: int | None = None,
) -> PruneReport:
    """Prune ``model`` in place, stage by stage, and return the per-layer report.

    If a stage fails after earlier stages were cut, the exception propagates and the model is left
    part-pruned with ``model.osscar_state == "incomplete"`` (:data:`INCOMPLETE`), which
    :func:`osscar_opt.save_pruned` refuses; every check of the arguments runs before any cut.

    Args:
        model: a supported model (see :func:`osscar_opt.adapters.registry.adapter_for`): a
            transformers BERT / OPT / GPT-2 / LLaMA-family model or a torchvision ResNet /
            MobileNetV2, already on its device and in its forward dtype.
        calibration: transformers: ``(samples, seq_len)`` int64 token ids (every position a real
            token); torchvision: ``(N, C, H, W)`` float images normalized as the model expects, or
            an iterable of such batches.
        budgets: structure kind -> sparsity (fraction of groups removed per structure), e.g.
            ``{"heads": 0.25, "neurons": 0.25}``, ``{"kv_groups": 0.34, "neurons": 0.5}`` or
            ``{"channels": 0.3}``; or any :class:`osscar_opt.budget.Budget`.
        backend: backend name for :func:`osscar_opt.solve`; ``backend_options`` its options.
        refit_bias: re-fit the consumer biases; bias-free consumers gain one where the family's save
            format records it (torchvision), and are left bias-free otherwise (transformers).
        damp: ridge weight relative to the mean diagonal of ``X^T X``; or ``"auto"`` (default): every
            4th calibration sample is held out, the backend searches at ridge 1e-2 on the other
            samples (local search returns the candidate whose re-fit is best on the held-out
            samples), the ridge is chosen per layer from ``accumulator.DAMP_GRID`` by held-out
            error, and the kept weights are re-fit on all samples with it.
        target: what each pruned layer is fit to (docs/architecture.md, "Calibration target"):
            ``"pruned-input"``: the layer's dense weights applied to the pruned model's input,
            ``Y = X_pruned W^T`` (SparseGPT / ZipLM / OSSCAR's code; no dense copy runs);
            ``"dense-output"``: the dense model's output of that layer, ``Y = X_dense W^T``;
            None: the family's default (``adapter.default_target``: pruned-input for
            transformers, dense-output for torchvision networks).
        objective: ``"energy"``: the squared error summed over calibration rows (tokens with
            large outputs dominate); ``"token"``: each row's squared error divided by its dense
            output's squared norm ``||W x_t||^2``, so every token counts the same.
        batch_size: calibration samples per forward pass.
        save_problems: folder to write every layer problem to (``LayerProblem.save`` format, with
            the budget stored as ``problem.keep``); under ``damp="auto"`` the problem the backend
            searched (fit samples, ridge 1e-2, the held-out moments attached).
        progress: show a tqdm bar over stages.
        device: the compute device the stages run on; None: the device the model is on. Without
            ``offload`` it must be the model's device.
        offload: keep the model and the cached activations where the model is (the offload
            device, normally the CPU) and move one stage at a time to ``device`` for its
            calibration passes, solves and cuts, and back pruned; the stage inputs, call arguments
            and dense targets move to ``device`` one batch at a time. Only the current stage, one
            batch and that stage's statistics are on ``device``: a model larger than GPU memory
            prunes on one GPU. ``stage_inputs`` runs with the modules outside the stages
            (embeddings, head) on ``device``. With a :class:`CostTarget` the loss curves and cost
            tables are computed where the model is; a ``speedup`` target (latency measured on the
            compute device) is refused when that differs from it. On one device the result is
            the same as without it.
        executor, workers: where the loss curves of a :class:`CostTarget` are computed: None (this
            process, one after another) or an executor of :mod:`osscar_opt.batch` ("processes",
            "ray" or an :class:`~osscar_opt.executors.Executor`) with ``workers`` workers; the
            curves of the whole pass then run as one batch spread over the workers.
    """
    from tqdm.auto import tqdm

    from osscar_opt import backends

    adapter = adapter_for(model)
    placement = _placement(model, device, offload)
    budget = as_budget(budgets)
    if backend_options is not None and not isinstance(backend_options, Mapping):
        raise ValueError(f"backend_options: expected a mapping of option names to values, got {backend_options!r}")
    if damp != "auto" and (
        isinstance(damp, bool) or not isinstance(damp, int | float) or not 0 < damp < float("inf")
    ):
        raise ValueError(f"damp: expected a positive finite number or 'auto', got {damp!r}")
    if target is None:
        target = adapter.default_target
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {list(TARGETS)} or None, got {target!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {list(OBJECTIVES)}, got {objective!r}")
    backends.get(backend)  # an unknown backend fails before any forward pass
    _check_kinds(adapter, budget)
    if placement.offload and placement.compute != placement.storage and isinstance(budget, CostTarget) \
            and budget.metric == "speedup":
        raise ValueError(
            f"offload: a speedup target measures latency on the device the stages run on ({placement.compute}), "
            f"but with offload its latency tables would be measured where the model is ({placement.storage}); "
            "use a macs or params target with offload, or prune without offload"
        )
    if (executor is not None or workers is not None) and not isinstance(budget, CostTarget):
        raise ValueError("executor: only a CostTarget computes loss curves to spread over workers; with fixed "
                         "budgets give neither executor nor workers")
    batches = adapter.calibration_batches(calibration, batch_size)
    samples = sum(int(batch.shape[0]) for batch in batches)
    if damp == "auto" and samples < HELDOUT_EVERY:
        raise ValueError(
            f"damp: 'auto' (the default) holds out every {HELDOUT_EVERY}th calibration sample and needs at least "
            f"{HELDOUT_EVERY} samples, got {samples}; give more samples or a fixed ridge such as damp=0.01"
        )
    options = _Options(
        backend=backend, backend_options=dict(backend_options or {}), refit_bias=bool(refit_bias),
        damp=damp if damp == "auto" else float(damp), target=target, objective=objective,
        save_problems=None if save_problems is None else Path(save_problems),
    )
    if options.save_problems is not None:
        options.save_problems.mkdir(parents=True, exist_ok=True)
        (options.save_problems / INCOMPLETE_MARKER).write_text(
            "osscar_opt is writing layer problems here; this file is removed when the prune finishes. If it is "
            "still here, the prune was interrupted and the folder holds the problems of the first stages only.\n"
        )
    curve_executor = None
    if executor is not None or workers is not None:
        from osscar_opt.executors import Executor, make_executor

        curve_executor = executor if isinstance(executor, Executor) else make_executor(
            executor or "processes", workers)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    report = PruneReport(settings={
        "family": adapter.family, "architecture": adapter.architecture,
        "budgets": budget.to_dict() if hasattr(budget, "to_dict") else repr(budget),
        "backend": backend, "backend_options": {k: str(v) for k, v in options.backend_options.items()},
        "refit_bias": options.refit_bias, "damp": options.damp, "target": target, "objective": objective,
        "samples": samples,
        "sample_shape": list(batches[0].shape[1:]),
        "offload": placement.offload, "device": str(placement.compute),
        "curve_executor": None if curve_executor is None else curve_executor.describe(),
    })
    try:
        with torch.no_grad(), placement.outside_stages_on_compute(adapter):
            dense_in, calls = adapter.stage_inputs([placement.fetch(batch) for batch in batches])
        dense_in, calls = placement.store(dense_in), placement.store(calls)
        plan = _plan(adapter, budget, options, batches, dense_in, calls, placement)
        report.settings["plan"] = asdict(plan)
        if progress:
            tqdm.write(plan.describe())
        allocator = None
        if isinstance(budget, CostTarget):
            allocator = _Allocator(adapter, budget, options, batches, calls, placement, curve_executor)
            allocator.initial(dense_in, progress)
            report.settings["allocation"] = allocator.summary()
        pruned_in = dense_in
        if target == "pruned-input":
            dense_in = None  # no dense copy runs
        stages = adapter.stages()
        for index in tqdm(range(len(stages)), desc="pruning", unit="stage", disable=not progress):
            if allocator is not None and budget.reallocate and index > 0:
                allocator.reallocate(index, stages[index], pruned_in)
            pruner = _StagePruner(adapter, index, stages[index], budget, options, placement)
            try:
                records, dense_in, pruned_in = pruner.run(dense_in, pruned_in, calls)
            except BaseException:
                # stages (or this stage's first structures) may already be cut in place: mark the
                # model so that save_pruned refuses it
                model.osscar_state = INCOMPLETE
                raise
            report.layers.extend(records)
        if allocator is not None:
            report.settings["allocation"] = allocator.summary(achieved=True)
        report.settings["config_describes_pruned_model"] = adapter.sync_config()
        if options.save_problems is not None:
            (options.save_problems / INCOMPLETE_MARKER).unlink(missing_ok=True)
    finally:
        model.train(was_training)
        if curve_executor is not None and curve_executor is not executor:
            curve_executor.close()
    report.seconds = time.perf_counter() - start
    return report


def prune_vision(
    model: nn.Module,
    calibration_images: Any,
    budgets: Budget | Mapping[str, float],
    *,
    device: torch.device | str | None = None,
    batch_size: int = 32,
    offload: bool = False,
    **options: Any,
) -> tuple[nn.Module, PruneReport]:
    """:func:`prune` on a deep copy of ``model`` (moved to ``device`` when given); the original is
    left alone. Returns ``(pruned copy in eval mode, report)``. ``budgets`` is e.g. ``{"channels": 0.3}``.

    With ``offload=True`` the copy is kept on the CPU (the offload device) and ``device`` (default:
    the device ``model`` is on) is the compute device each stage moves to; the pruned copy is
    returned on the CPU."""
    if not isinstance(offload, bool):
        raise ValueError(f"offload: expected True or False, got {offload!r}")
    if offload:
        compute = model_device(model) if device is None else resolve_device(device)
        pruned = copy.deepcopy(model).to(torch.device("cpu"))
        report = prune(pruned, calibration_images, budgets, batch_size=batch_size, device=compute, offload=True,
                       **options)
        return pruned.eval(), report
    pruned = copy.deepcopy(model)
    if device is not None:
        pruned = pruned.to(resolve_device(device))
    report = prune(pruned, calibration_images, budgets, batch_size=batch_size, **options)
    return pruned.eval(), report
