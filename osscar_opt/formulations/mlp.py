"""MLP formulation: one neuron = one input column of the down projection.

Producers are the up projection (and the gate projection for SwiGLU): row ``i`` of each, with its
bias entry, is neuron ``i``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from osscar_opt.formulations.layers import check_linear, matrix_shape
from osscar_opt.formulations.structures import Producer, Structure


def neuron_structure(
    name: str,
    producers: Sequence[nn.Module],
    down: nn.Module,
    on_resize: Callable[[int], None] | None = None,
) -> Structure:
    """MLP neurons as single-column groups of ``down`` (``intermediate_size`` inputs)."""
    down = check_linear(down, f"{name} (MLP down projection)")
    width = matrix_shape(down)[1]
    groups = [[i] for i in range(width)]
    linears = [check_linear(m, f"{name} producer") for m in producers]
    for module in linears:
        if matrix_shape(module)[0] != width:
            raise ValueError(
                f"model: {name} producer has {matrix_shape(module)[0]} outputs, down projection {width} inputs"
            )
    return Structure(name, "neurons", down, groups, [Producer(m, groups) for m in linears], on_resize)
