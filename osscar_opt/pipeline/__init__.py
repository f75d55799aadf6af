"""The one pruning pipeline: calibrate, lower, solve and cut, one stage at a time, for every family.

:func:`prune` reads as the pipeline (docs/architecture.md, "The pipeline"): the arguments are
checked once (:mod:`.settings`), the calibration becomes the first stage's inputs (the adapter),
the plan line is printed (:mod:`.plan`), a cost target is allocated (:mod:`.allocation`), then
every stage is calibrated, lowered, solved and cut in turn (:mod:`.stage`) and the model's config
is brought up to date. Where the stages run and where activations wait is :mod:`.placement`; what
comes back is :mod:`.report`. The model is pruned in place.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osscar_opt.adapters.base import StageCall, model_device
from osscar_opt.budget import Budget
from osscar_opt.pipeline.allocation import Allocator
from osscar_opt.pipeline.placement import resolve_device
from osscar_opt.pipeline.plan import make_plan
from osscar_opt.pipeline.report import INCOMPLETE, LayerRecord, PruneReport
from osscar_opt.pipeline.settings import (
    DEFAULT_DAMP,
    DEFAULT_OBJECTIVE,
    HELDOUT_EVERY,
    OBJECTIVES,
    SEARCH_DAMP,
    TARGETS,
    Settings,
)
from osscar_opt.pipeline.stage import INCOMPLETE_MARKER, StagePruner, finish_problem_folder, start_problem_folder

__all__ = [
    "DEFAULT_DAMP", "DEFAULT_OBJECTIVE", "HELDOUT_EVERY", "INCOMPLETE", "INCOMPLETE_MARKER", "OBJECTIVES",
    "SEARCH_DAMP", "TARGETS", "LayerRecord", "PruneReport", "prune", "prune_vision", "resolve_device",
]


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

    Every argument is checked before any work (:class:`~osscar_opt.pipeline.settings.Settings`). If
    a stage fails after earlier stages were cut, the exception propagates and the model is marked
    ``model.osscar_state == "incomplete"``, which :func:`osscar_opt.save_pruned` refuses.

    Args:
        model: a supported transformers or torchvision model, on its device and in its dtype.
        calibration: ``(samples, seq_len)`` int64 token ids (every position a real token), or
            ``(N, C, H, W)`` float images normalized as the model expects (or batches of them).
        budgets: structure kind -> fraction of groups removed per structure, e.g. ``{"heads":
            0.25, "neurons": 0.25}``, ``{"kv_groups": 0.34, "neurons": 0.5}``, ``{"channels":
            0.3}``; or a :class:`~osscar_opt.budget.Budget` (``CostTarget``, ``PerLayerKeep``).
        backend, backend_options: the solver (:func:`osscar_opt.solve`) and its options.
        refit_bias: re-fit consumer biases (bias-free ones gain one where the save format allows).
        damp: ridge relative to the mean diagonal of ``X^T X``; ``"auto"`` (default): every 4th
            sample is held out, the support is searched at ridge 1e-2 on the others, the ridge
            (and local search's candidate) is chosen per layer by held-out error, and the kept
            weights are re-fit on all samples.
        target: what each layer is fit to: ``"pruned-input"`` (its dense weights on the pruned
            model's input), ``"dense-output"`` (the dense model's layer output), None: the family's.
        objective: ``"energy"`` (squared error summed over rows) or ``"token"`` (each row's error
            over its dense output's squared norm).
        batch_size: calibration samples per forward pass; ``progress``: bars and the plan line.
        save_problems: folder every layer problem is written to (with its budget as ``keep``).
        device, offload: the compute device (default: the model's); with ``offload`` the model
            and cached activations stay where the model is and one stage at a time moves there.
        executor, workers: where a ``CostTarget``'s loss curves are computed (None: here; or an
            executor of :mod:`osscar_opt.batch` with ``workers`` workers).
    """
    settings = Settings.build(
        model, calibration, budgets, backend=backend, backend_options=backend_options, refit_bias=refit_bias,
        damp=damp, target=target, objective=objective, batch_size=batch_size, save_problems=save_problems,
        progress=progress, device=device, offload=offload, executor=executor, workers=workers,
    )
    start = time.perf_counter()
    report = PruneReport(settings=settings.describe())
    with _pruning(settings):
        dense_in, calls = _stage_inputs(settings)
        plan = make_plan(settings, dense_in, calls)
        report.settings["plan"] = asdict(plan)
        _announce(settings, plan.describe())
        allocator = None
        if settings.cost_target is not None:
            allocator = Allocator(settings, calls)
            allocator.initial(dense_in, settings.progress)
            report.settings["allocation"] = allocator.summary()
        report.layers.extend(_prune_stages(settings, allocator, dense_in, calls))
        if allocator is not None:
            report.settings["allocation"] = allocator.summary(achieved=True)
        report.settings["config_describes_pruned_model"] = settings.adapter.sync_config()
    report.seconds = time.perf_counter() - start
    return report


@contextlib.contextmanager
def _pruning(settings: Settings) -> Iterator[None]:
    """The model in eval mode while it is pruned (its mode restored after), the problem folder
    marked incomplete until the prune finishes, the curve executor closed at the end."""
    model = settings.adapter.model
    was_training = model.training
    try:
        start_problem_folder(settings.save_problems)
        model.eval()
        yield
        finish_problem_folder(settings.save_problems)
    finally:
        model.train(was_training)
        settings.close()


def _stage_inputs(settings: Settings) -> tuple[list[torch.Tensor], list[StageCall]]:
    """The first stage's inputs and every batch's call arguments, kept on the offload device."""
    placement = settings.placement
    with torch.no_grad(), placement.outside_stages_on_compute(settings.adapter):
        dense_in, calls = settings.adapter.stage_inputs([placement.fetch(batch) for batch in settings.batches])
    return placement.store(dense_in), placement.store(calls)


def _announce(settings: Settings, line: str) -> None:
    if settings.progress:
        from tqdm.auto import tqdm

        tqdm.write(line)


def _prune_stages(settings: Settings, allocator: Allocator | None, dense_in: list[torch.Tensor],
                  calls: list[StageCall]) -> list[LayerRecord]:
    """Prune every stage in order; the pruned inputs of stage ``i + 1`` are stage ``i``'s pruned
    outputs. Marks the model incomplete when a stage fails (earlier stages are already cut)."""
    from tqdm.auto import tqdm

    records: list[LayerRecord] = []
    pruned_in = dense_in
    if settings.target == "pruned-input":
        dense_in = None  # no dense copy runs
    stages = settings.adapter.stages()
    for index in tqdm(range(len(stages)), desc="pruning", unit="stage", disable=not settings.progress):
        if allocator is not None and settings.cost_target.reallocate and index > 0:
            allocator.reallocate(index, stages[index], pruned_in)
        try:
            stage_records, dense_in, pruned_in = StagePruner(settings, index, stages[index]).run(
                dense_in, pruned_in, calls)
        except BaseException:
            settings.adapter.model.osscar_state = INCOMPLETE
            raise
        records.extend(stage_records)
    return records


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
