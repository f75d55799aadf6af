"""The plan line: what a prune will do and roughly cost, known before the first structure is solved."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from osscar_opt.adapters.base import StageCall
from osscar_opt.data.coverage import coverage
from osscar_opt.pipeline.settings import Settings


@dataclass
class Plan:
    """What a :func:`prune` run will do and roughly cost, known before the first structure is solved.

    ``problems`` counts the structures of the kinds the budget names (at most that many layer
    problems: a budget may still leave some alone).

    ``rows``: calibration rows per layer problem (tokens, or output positions of the first conv);
    ``activation_bytes``: the stage inputs held in memory (twice for ``dense-output``);
    ``problem_bytes``: the float64 statistics of the largest problem (``H``, ``X^T X`` and, under
    ``damp="auto"``, the held-out copy); ``forward_seconds``: the calibration forward passes,
    extrapolated from one timed pass of the first stage; ``solve_seconds``: the solves, from one
    timed Cholesky factorization of the largest problem's size (:data:`CHOLESKY_PER_SOLVE` of them per
    problem); ``curve_seconds``: a cost target's loss curves (their forward passes and
    :data:`CHOLESKY_PER_CURVE` factorizations per problem), None without a target;
    ``coverage``: how much distinct text token calibration holds (:mod:`osscar_opt.data.coverage`).
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
    solve_seconds: float = 0.0
    curve_seconds: float | None = None
    coverage: str | None = None

    def describe(self) -> str:
        shape = " x ".join(str(d) for d in self.sample_shape)
        if self.tokens:
            data = f"{self.samples} x {shape} = {self.samples * _product(self.sample_shape):,} calibration tokens"
            if self.coverage:
                data += f" ({self.coverage})"
        else:
            data = f"{self.samples} calibration images of {shape}"
        time = f"forward passes about {self.forward_seconds:.0f} s, solves roughly {self.solve_seconds:.0f} s"
        if self.curve_seconds is not None:
            time += f", loss curves roughly {self.curve_seconds:.0f} s"
        return (
            f"plan: {data}, {self.stages} stages, up to {self.problems} layer problems (largest {self.largest_columns} "
            f"columns); memory about {_gib(self.activation_bytes + self.problem_bytes)} "
            f"(activations {_gib(self.activation_bytes)}, largest problem {_gib(self.problem_bytes)}); {time}"
        )


def _product(values) -> int:
    total = 1
    for value in values:
        total *= int(value)
    return total


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**28 else f"{count / 2**20:.0f} MiB"


def make_plan(settings: Settings, dense_in: list[torch.Tensor], calls: list[StageCall]) -> Plan:
    """Count the problems, size the memory and time one pass of the first stage (on the compute
    device; ``activation_bytes`` are held on the offload device under offload)."""
    adapter, placement, batches = settings.adapter, settings.placement, settings.batches
    stages = adapter.stages()
    problems, largest = 0, 0
    kinds = set(settings.budget.kinds())  # the budget's keep() is asked only when a structure is reached
    for stage in stages:
        for structure in stage.structures(stage.module):
            if structure.kind in kinds:
                problems += 1
                largest = max(largest, structure.in_features + 1)
    copies = 2 if settings.target == "dense-output" else 1
    activation_bytes = copies * sum(t.numel() * t.element_size() for t in dense_in)
    problem_bytes = (3 if settings.split else 2) * 8 * largest * largest
    with torch.no_grad(), placement.stage_on_compute(stages[0].module):
        hidden, call = placement.fetch(dense_in[0]), placement.fetch(calls[0])
        start = time.perf_counter()
        adapter.run_stage(stages[0], hidden, call)
        one_pass = time.perf_counter() - start
    passes_per_stage = (problems / max(len(stages), 1) + 1) + (1 if settings.target == "dense-output" else 0)
    forward = one_pass * len(batches) * len(stages) * passes_per_stage
    factorization = _cholesky_seconds(largest, placement.compute)
    curves = None
    if settings.cost_target is not None:
        curves = one_pass * len(batches) * len(stages) * (problems / max(len(stages), 1) + 1)
        curves += problems * CHOLESKY_PER_CURVE * factorization
    tokens = not batches[0].is_floating_point()
    return Plan(
        samples=sum(int(b.shape[0]) for b in batches), sample_shape=list(batches[0].shape[1:]),
        tokens=tokens, stages=len(stages), problems=problems,
        largest_columns=max(largest - 1, 0),
        activation_bytes=activation_bytes, problem_bytes=problem_bytes,
        forward_seconds=forward, solve_seconds=problems * CHOLESKY_PER_SOLVE * factorization, curve_seconds=curves,
        coverage=coverage(batches).describe() if tokens else None,
    )


CHOLESKY_PER_SOLVE = 10
"""Local search costs about ten Cholesky factorizations of its problem (benchmarks/solver_scaling.py)."""
CHOLESKY_PER_CURVE = 40
"""A loss curve costs about this many: a warm-started descent over the grid, every point re-fit."""


def _cholesky_seconds(size: int, device: torch.device) -> float:
    """Seconds of one float64 Cholesky factorization of a ``size x size`` matrix on ``device``."""
    if size < 2:
        return 0.0
    matrix = torch.eye(size, dtype=torch.float64, device=device) * size
    matrix += torch.ones(size, size, dtype=torch.float64, device=device)
    torch.linalg.cholesky(matrix)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    torch.linalg.cholesky(matrix)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
