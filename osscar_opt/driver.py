"""Sequential pruning driver: calibrate, lower, solve and operate on one block at a time.

For block ``i``: the *dense* copy of the block runs on the dense model's block input and gives the
targets (each consumer layer's full output); the live block runs on the already-pruned model's
block input and gives the consumer inputs ``X``. Statistics are accumulated streaming in float64
(:class:`~osscar_opt.statistics.StatsAccumulator`); the attention structure is solved and cut
first, then the MLP structure is calibrated on the pruned attention, solved and cut. Only one
block's activations are held in memory.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osscar_opt.adapters.base import ModelAdapter, adapter_for
from osscar_opt.formulations.structures import Structure
from osscar_opt.solving import solve
from osscar_opt.statistics import StatsAccumulator
from osscar_opt.surgery import apply_solution


@dataclass
class LayerRecord:
    """What happened to one consumer layer (one row of the JSON report)."""

    block: int
    name: str
    kind: str
    groups: int
    keep: int
    loss: float
    dense_loss: float
    relative_loss: float
    backend: str
    status: str
    solve_seconds: float
    calibration_seconds: float


@dataclass
class PruneReport:
    """Per-layer records of a :func:`prune` run and its total wall time (seconds)."""

    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "seconds": self.seconds, "layers": [asdict(r) for r in self.layers]}


class _Stop(Exception):
    """Raised by the input catcher to end a forward pass at the first block."""


@dataclass
class _BlockCall:
    """The extra positional and keyword arguments the model passes to its blocks for one batch."""

    args: tuple
    kwargs: dict[str, Any]


def check_sparsity(value: float, name: str) -> float:
    """A fraction in ``[0, 1)``; anything else is a ValueError naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a fraction in [0, 1), got {value!r}") from exc
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a fraction in [0, 1), got {value}")
    return value


def _batches(calibration: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration: expected a non-empty (samples, seq_len) tensor of token ids, got {shape}")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return list(calibration.split(int(batch_size)))


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def _capture_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: Sequence[torch.Tensor], causal: bool
) -> tuple[list[torch.Tensor], list[_BlockCall]]:
    """Run the model up to the first block for every batch; return its hidden input and call args."""
    hidden: list[torch.Tensor] = []
    calls: list[_BlockCall] = []

    def catch(_module, args, kwargs):
        if args:
            hidden.append(args[0].detach())
            rest = args[1:]
        else:
            hidden.append(kwargs.pop("hidden_states").detach())
            rest = ()
        calls.append(_BlockCall(rest, dict(kwargs)))
        raise _Stop

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            ids = ids.to(next(model.parameters()).device)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if causal:
                inputs["use_cache"] = False
            with contextlib.suppress(_Stop):
                model(**inputs)
    finally:
        handle.remove()
    return hidden, calls


def _run_block(block: nn.Module, hidden: torch.Tensor, call: _BlockCall) -> torch.Tensor:
    return _first_output(block(hidden, *call.args, **call.kwargs))


def _record_io(module: nn.Module, store: list, what: str):
    """Forward hook appending the module's input (``what='input'``) or output to ``store``."""

    def hook(_module, inputs, output):
        store.append((inputs[0] if what == "input" else output).detach())

    return module.register_forward_hook(hook)


class _BlockPruner:
    """Prunes one block given the dense and pruned block inputs of every batch."""

    def __init__(self, adapter: ModelAdapter, index: int, options: Mapping[str, Any]) -> None:
        self.adapter = adapter
        self.index = index
        self.block = adapter.blocks()[index]
        self.prefix = adapter.block_name(index)
        self.options = options

    def structures(self, block: nn.Module) -> dict[str, Structure]:
        return {"attention": self.adapter.attention(block, self.prefix), "mlp": self.adapter.mlp(block, self.prefix)}

    def dense_pass(self, dense_block, dense_in, calls) -> tuple[dict[str, list], list[torch.Tensor]]:
        """Targets of every consumer and the dense block outputs, batch by batch."""
        targets: dict[str, list] = {"attention": [], "mlp": []}
        outputs = []
        dense = self.structures(dense_block)
        handles = [_record_io(dense[key].consumer, targets[key], "output") for key in targets]
        try:
            with torch.no_grad():
                for hidden, call in zip(dense_in, calls, strict=True):
                    outputs.append(_run_block(dense_block, hidden, call).detach())
        finally:
            for handle in handles:
                handle.remove()
        return targets, outputs

    def prune_structure(self, key: str, keep_fraction: float, pruned_in, calls, targets) -> LayerRecord:
        """Calibrate the live block's ``key`` structure, solve it and cut it."""
        start = time.perf_counter()
        structure = self.structures(self.block)[key]
        consumer = structure.consumer
        device = consumer.weight.device
        accumulator = StatsAccumulator(structure.in_features, structure.out_features, device=device)
        inputs: list[torch.Tensor] = []
        handle = _record_io(consumer, inputs, "input")
        try:
            with torch.no_grad():
                for hidden, call, target in zip(pruned_in, calls, targets, strict=True):
                    _run_block(self.block, hidden, call)
                    accumulator.add(inputs.pop(), target)
        finally:
            handle.remove()
        refit = bool(self.options["refit_bias"]) and consumer.bias is not None
        problem = accumulator.problem(
            structure.weight(),
            structure.groups,
            damp=self.options["damp"],
            bias=None if consumer.bias is None else consumer.bias.detach(),
            refit_bias=refit,
            meta={"name": structure.name, "kind": structure.kind, "block": str(self.index)},
        )
        del accumulator
        keep = structure.keep_count(1.0 - keep_fraction)
        problem.meta["keep"] = str(keep)
        calibration_seconds = time.perf_counter() - start
        if self.options["save_problems"] is not None:
            path = Path(self.options["save_problems"]) / f"{self.index:03d}_{key}_{structure.name}.safetensors"
            problem.save(path)
        solution = solve(problem, keep, self.options["backend"], **self.options["backend_options"])
        apply_solution(self.block, structure, solution.support, solution.weights, solution.bias)
        dense_loss = problem.loss(range(problem.num_groups))
        return LayerRecord(
            block=self.index, name=structure.name, kind=structure.kind, groups=structure.num_groups, keep=keep,
            loss=solution.loss, dense_loss=dense_loss,
            relative_loss=solution.loss / problem.c0 if problem.c0 > 0 else 0.0,
            backend=solution.backend, status=solution.status, solve_seconds=solution.seconds,
            calibration_seconds=calibration_seconds,
        )

    def run(self, dense_in, pruned_in, calls, sparsity: Mapping[str, float]):
        """Prune this block; returns its records and the dense and pruned block outputs."""
        dense_block = copy.deepcopy(self.block)
        targets, dense_out = self.dense_pass(dense_block, dense_in, calls)
        del dense_block
        records = []
        for key in ("attention", "mlp"):
            if sparsity[key] > 0:
                fraction = 1.0 - sparsity[key]
                records.append(self.prune_structure(key, fraction, pruned_in, calls, targets[key]))
            targets[key] = None
        with torch.no_grad():
            pruned_out = [_run_block(self.block, h, c).detach() for h, c in zip(pruned_in, calls, strict=True)]
        return records, dense_out, pruned_out


def prune(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    heads_sparsity: float = 0.0,
    neurons_sparsity: float = 0.0,
    backend: str = "local-search",
    backend_options: Mapping[str, Any] | None = None,
    refit_bias: bool = False,
    damp: float = 1e-2,
    batch_size: int = 8,
    save_problems: str | Path | None = None,
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place, block by block, and return the per-layer report.

    Args:
        model: a supported transformers model (see :func:`~osscar_opt.adapters.base.adapter_for`),
            already on its device and in its forward dtype.
        calibration: ``(samples, seq_len)`` int64 token ids (every position is a real token).
        heads_sparsity: fraction of attention groups (heads, or KV groups for GQA) removed per block.
        neurons_sparsity: fraction of MLP neurons removed per block.
        backend: backend name for :func:`osscar_opt.solve`; ``backend_options`` its options.
        refit_bias: re-fit the bias of consumers that have one.
        damp: ridge weight relative to the mean diagonal of ``X^T X``.
        batch_size: calibration samples per forward pass.
        save_problems: folder to write every layer problem to (``LayerProblem.save`` format).
        progress: show a tqdm bar over blocks.
    """
    from tqdm.auto import tqdm

    sparsity = {
        "attention": check_sparsity(heads_sparsity, "heads_sparsity"),
        "mlp": check_sparsity(neurons_sparsity, "neurons_sparsity"),
    }
    adapter = adapter_for(model)
    batches = _batches(calibration, batch_size)
    if save_problems is not None:
        Path(save_problems).mkdir(parents=True, exist_ok=True)
    options = {
        "backend": backend, "backend_options": dict(backend_options or {}), "refit_bias": refit_bias,
        "damp": damp, "save_problems": save_problems,
    }
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        dense_in, calls = _capture_block_inputs(model, adapter.blocks()[0], batches, adapter.causal_lm)
    pruned_in = dense_in
    report = PruneReport(settings={
        "family": adapter.family, "heads_sparsity": sparsity["attention"], "neurons_sparsity": sparsity["mlp"],
        "backend": backend, "backend_options": {k: str(v) for k, v in options["backend_options"].items()},
        "refit_bias": refit_bias, "damp": damp, "samples": int(calibration.shape[0]),
        "seq_len": int(calibration.shape[1]),
    })
    blocks = adapter.blocks()
    for index in tqdm(range(len(blocks)), desc="pruning blocks", unit="block", disable=not progress):
        records, dense_in, pruned_in = _BlockPruner(adapter, index, options).run(dense_in, pruned_in, calls, sparsity)
        report.layers.extend(records)
    model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report
