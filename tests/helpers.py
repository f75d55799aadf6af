"""Random problem generators shared by the tests (no fixtures hidden here, just builders)."""

from __future__ import annotations

import torch

from osscar_opt import LayerProblem


def correlated_inputs(rows: int, columns: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    """Low-rank-plus-noise activations (rows x columns), float64."""
    generator = torch.Generator().manual_seed(seed)
    factors = torch.randn(rows, rank, generator=generator, dtype=torch.float64)
    mixing = torch.randn(rank, columns, generator=generator, dtype=torch.float64)
    scale = torch.rand(columns, generator=generator, dtype=torch.float64) + 0.5
    noise_part = noise * torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    return (factors @ mixing + noise_part) * scale


def random_problem(
    group_sizes: list[int],
    outputs: int = 6,
    seed: int = 0,
    rows: int = 300,
    rank: int = 5,
    noise: float = 0.3,
    damp: float = 1e-2,
) -> LayerProblem:
    """A problem with consecutive groups of the given sizes over correlated inputs."""
    columns = sum(group_sizes)
    X = correlated_inputs(rows, columns, rank, noise, seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    W = torch.randn(outputs, columns, generator=generator, dtype=torch.float64)
    groups, start = [], 0
    for size in group_sizes:
        groups.append(list(range(start, start + size)))
        start += size
    return LayerProblem.from_activations(X, W, groups, damp=damp)
