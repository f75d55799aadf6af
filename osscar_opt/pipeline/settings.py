"""Every argument of :func:`~osscar_opt.pipeline.prune`, checked once, before any work.

:meth:`Settings.build` turns the caller's arguments into one frozen :class:`Settings`: the model's
adapter, where things run (:class:`~osscar_opt.pipeline.placement.Placement`), the budget, the
calibration batches, the solver and fit settings and the executor for loss curves. Each bad
argument is a ValueError naming it; nothing has run on the model when one is raised.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osscar_opt.adapters.base import ModelAdapter
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.allocation_search import MIN_SCORE_SAMPLES
from osscar_opt.budget import Budget, CostTarget, UniformSparsity, as_budget
from osscar_opt.pipeline.placement import Placement, placement_for

TARGETS = ("pruned-input", "dense-output")
OBJECTIVES = ("energy", "token")
DEFAULT_OBJECTIVE = "energy"
DEFAULT_DAMP: float | str = "auto"
# damp="auto": every HELDOUT_EVERY-th calibration sample is held out; the support is searched at
# ridge SEARCH_DAMP, the re-fit ridge is chosen from accumulator.DAMP_GRID on the held-out samples.
HELDOUT_EVERY = 4
SEARCH_DAMP = 1e-2


@dataclass(frozen=True)
class Settings:
    """The checked arguments of one prune.

    Attributes:
        adapter: the model's family adapter (``adapter.model``: the model, pruned in place).
        placement: the compute device and (with offload) where the model and activations live.
        budget: how many groups each structure keeps (a :class:`~osscar_opt.budget.CostTarget` is
            allocated first).
        batches: the calibration, as the adapter's batches (token ids ``(b, seq_len)`` or images
            ``(b, C, H, W)``).
        backend, backend_options: the solver and its options.
        refit_bias: re-fit the consumer biases.
        damp: the ridge relative to the mean diagonal of ``X^T X``, or ``"auto"``.
        target: ``"pruned-input"`` or ``"dense-output"``; ``objective``: ``"energy"`` or ``"token"``.
        save_problems: folder every layer problem is written to, or None.
        progress: show progress bars and the plan line.
        curve_executor: where a cost target's loss curves are computed (None: this process);
            ``owns_executor``: whether prune made it (and so closes it).
        search_batches: the held-out samples a cost target's allocation search scores on, as the
            adapter's batches (None without a search).
    """

    adapter: ModelAdapter
    placement: Placement
    budget: Budget
    batches: list[torch.Tensor]
    backend: str
    backend_options: Mapping[str, Any]
    refit_bias: bool
    damp: float | str
    target: str
    objective: str
    save_problems: Path | None
    progress: bool
    curve_executor: Any = None
    owns_executor: bool = False
    search_batches: list[torch.Tensor] | None = None

    @property
    def split(self) -> bool:
        """Whether calibration samples are split into fit and held-out samples (``damp="auto"``)."""
        return self.damp == "auto"

    @property
    def samples(self) -> int:
        return sum(int(batch.shape[0]) for batch in self.batches)

    @property
    def cost_target(self) -> CostTarget | None:
        """The budget when it is a global target to allocate, else None."""
        return self.budget if isinstance(self.budget, CostTarget) else None

    @classmethod
    def build(
        cls,
        model: nn.Module,
        calibration: Any,
        budgets: Budget | Mapping[str, float],
        *,
        backend: str,
        backend_options: Mapping[str, Any] | None,
        refit_bias: bool,
        damp: float | str,
        target: str | None,
        objective: str,
        batch_size: int,
        save_problems: str | Path | None,
        progress: bool,
        device: torch.device | str | None,
        offload: bool,
        executor: Any,
        workers: int | None,
    ) -> Settings:
        """Check every argument of :func:`~osscar_opt.pipeline.prune` (see there) and return them as
        one object; a ValueError names the first bad one."""
        from osscar_opt import backends

        adapter = adapter_for(model)
        placement = placement_for(model, device, offload)
        budget = as_budget(budgets)
        if backend_options is not None and not isinstance(backend_options, Mapping):
            raise ValueError(f"backend_options: expected a mapping of option names to values, got {backend_options!r}")
        damp = _checked_damp(damp)
        target = adapter.default_target if target is None else target
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {list(TARGETS)} or None, got {target!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {list(OBJECTIVES)}, got {objective!r}")
        backends.get(backend)  # an unknown backend fails before any forward pass
        _check_kinds(adapter, budget)
        _check_aligned_widths(adapter, budget)
        _check_offload_target(placement, budget)
        _check_allow_empty(adapter, budget)
        if (executor is not None or workers is not None) and not isinstance(budget, CostTarget):
            raise ValueError("executor: only a CostTarget computes loss curves to spread over workers; with fixed "
                             "budgets give neither executor nor workers")
        batches = adapter.calibration_batches(calibration, batch_size)
        samples = sum(int(batch.shape[0]) for batch in batches)
        if damp == "auto" and samples < HELDOUT_EVERY:
            raise ValueError(
                f"damp: 'auto' (the default) holds out every {HELDOUT_EVERY}th calibration sample and needs at "
                f"least {HELDOUT_EVERY} samples, got {samples}; give more samples or a fixed ridge such as damp=0.01"
            )
        if not batches[0].is_floating_point():  # token ids: is the text repeated or degenerate?
            from osscar_opt.data.coverage import coverage

            for message in coverage(batches).warnings():
                warnings.warn(message, UserWarning, stacklevel=3)
        search_batches = _search_batches(adapter, placement, budget, batch_size)
        curve_executor, owns = _curve_executor(executor, workers)
        return cls(
            adapter=adapter, placement=placement, budget=budget, batches=batches, backend=backend,
            backend_options=dict(backend_options or {}), refit_bias=bool(refit_bias), damp=damp, target=target,
            objective=objective, save_problems=None if save_problems is None else Path(save_problems),
            progress=bool(progress), curve_executor=curve_executor, owns_executor=owns, search_batches=search_batches,
        )

    def describe(self) -> dict[str, Any]:
        """The settings part of the report (plain data)."""
        budget = self.budget
        return {
            "family": self.adapter.family, "architecture": self.adapter.architecture,
            "budgets": budget.to_dict() if hasattr(budget, "to_dict") else repr(budget),
            "backend": self.backend, "backend_options": {k: str(v) for k, v in self.backend_options.items()},
            "refit_bias": self.refit_bias, "damp": self.damp, "target": self.target, "objective": self.objective,
            "samples": self.samples, "sample_shape": list(self.batches[0].shape[1:]),
            "offload": self.placement.offload, "device": str(self.placement.compute),
            "curve_executor": None if self.curve_executor is None else self.curve_executor.describe(),
        }

    def close(self) -> None:
        """Release what :meth:`build` made (the curve executor's workers)."""
        if self.curve_executor is not None and self.owns_executor:
            self.curve_executor.close()


def _checked_damp(damp: Any) -> float | str:
    if damp == "auto":
        return damp
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not 0 < damp < float("inf"):
        raise ValueError(f"damp: expected a positive finite number or 'auto', got {damp!r}")
    return float(damp)


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
    if isinstance(budget, UniformSparsity) or (isinstance(budget, CostTarget) and "q_heads" in wanted):
        # "heads" and "kv_groups" name the one attention structure (plain heads or GQA groups)
        lacking = sorted(kind for kind in wanted - present
                         if not (kind in ATTENTION_KINDS and ATTENTION_KINDS & present))
        if lacking:
            reason = " (q_heads needs GQA: fewer key-value heads than query heads)" if "q_heads" in lacking else ""
            raise ValueError(f"budgets: prune {lacking}, but this {adapter.architecture} model has only "
                             f"{sorted(present)}{reason}")


ATTENTION_KINDS = {"heads", "kv_groups"}


def _check_aligned_widths(adapter: ModelAdapter, budget: Budget) -> None:
    """A fixed budget with ``multiple_of`` (``UniformSparsity``) asks every structure for its keep
    before any forward pass, so a structure narrower than the multiple is refused before pruning;
    a ``CostTarget``'s aligned keep grid is checked by its allocation, also before any cut."""
    if isinstance(budget, CostTarget) or getattr(budget, "multiple_of", 1) == 1:
        return
    for structure in adapter.structures():
        budget.keep(structure.name, structure.kind, structure.num_groups)


def _check_offload_target(placement: Placement, budget: Budget) -> None:
    """A speed-up target times the stages where the model is, so it cannot offload to another device."""
    if placement.offload and placement.compute != placement.storage and isinstance(budget, CostTarget) \
            and budget.metric == "speedup":
        raise ValueError(
            f"offload: a speedup target measures latency on the device the stages run on ({placement.compute}), "
            f"but with offload its latency tables would be measured where the model is ({placement.storage}); "
            "use a macs or params target with offload, or prune without offload"
        )


def _check_allow_empty(adapter: ModelAdapter, budget: Budget) -> None:
    """``allow_empty`` needs a targeted structure whose sublayer the family's forward code can drop."""
    if not (isinstance(budget, CostTarget) and budget.allow_empty):
        return
    if not any(structure.can_empty for structure in adapter.structures() if structure.kind in budget.kinds()):
        raise ValueError(
            f"allow_empty: the {adapter.family} family ({adapter.architecture}) cannot drop a whole "
            f"{'/'.join(sorted(budget.kinds()))} sublayer (its forward code needs at least one group); prune it "
            "without allow_empty (--allow-empty). Families that can: the LLaMA layout (LLaMA, Qwen, Mistral, "
            "Gemma, SmolLM, Granite, OLMo)"
        )
    if budget.search is None:
        warnings.warn(
            "allow_empty: without an allocation search the dynamic program removes sublayers by their summed layer "
            "losses, which misjudge what a removal does to the model's output (SmolLM2-135M at 0.5 of its MACs: "
            "perplexity 1447 with removals against 172 without, docs/targets.md); add a search "
            "(--search-evaluations), which starts from the better of the two allocations",
            UserWarning, stacklevel=4,
        )


def _search_batches(adapter: ModelAdapter, placement: Placement, budget: Budget,
                    batch_size: int) -> list[torch.Tensor] | None:
    """A cost target's search samples as the adapter's batches (None without a search); too few
    samples, or offload (the search runs the whole model on the compute device), are refused."""
    search = budget.search if isinstance(budget, CostTarget) else None
    if search is None:
        return None
    if placement.offload:
        raise ValueError("search: scores candidates with the whole model on the compute device; not with offload")
    try:  # batches of a quarter of the samples at most, so that a first share of them is whole batches
        samples = int(search.calibration.shape[0]) if hasattr(search.calibration, "shape") else batch_size
        batches = adapter.calibration_batches(search.calibration, max(1, min(batch_size, samples // 4)))
    except ValueError as error:
        raise ValueError(f"search calibration: {error}") from None
    samples = sum(int(batch.shape[0]) for batch in batches)
    if samples < MIN_SCORE_SAMPLES:
        raise ValueError(f"search calibration: the search scores candidates on at least {MIN_SCORE_SAMPLES} held-out "
                         f"samples, got {samples}")
    return [placement.fetch(batch) for batch in batches]


def _curve_executor(executor: Any, workers: int | None) -> tuple[Any, bool]:
    """The executor the loss curves run on (None: this process), and whether it was made here."""
    if executor is None and workers is None:
        return None, False
    from osscar_opt.executors import Executor, make_executor

    if isinstance(executor, Executor) and workers is None:
        return executor, False
    return make_executor(executor or "processes", workers), True  # refuses workers beside an Executor
