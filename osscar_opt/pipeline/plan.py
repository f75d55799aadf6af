"""The plan line: what a prune will do and roughly cost, known before the first structure is solved."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from osscar_opt.adapters.base import StageCall
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
    return Plan(
        samples=sum(int(b.shape[0]) for b in batches), sample_shape=list(batches[0].shape[1:]),
        tokens=not batches[0].is_floating_point(), stages=len(stages), problems=problems,
        largest_columns=max(largest - 1, 0),
        activation_bytes=activation_bytes, problem_bytes=problem_bytes,
        forward_seconds=one_pass * len(batches) * len(stages) * passes_per_stage,
    )
