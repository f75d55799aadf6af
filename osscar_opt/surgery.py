"""Surgery: write a solution back into the network and shrink the modules.

The consumer gets the solution's kept columns (and the re-fit bias, if any); every producer keeps
only the rows of the kept groups; ``Structure.on_resize`` updates head counts / sizes so the
stock forward code of the model runs on the smaller modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from osscar_opt.formulations.structures import Structure, is_conv1d, linear_shape, linear_weight, rows_for


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Module:
    """A layer of ``like``'s type (``nn.Linear`` or ``Conv1D``) holding ``weight`` (out, in) and ``bias``.

    The new layer has ``like``'s device and dtype.
    """
    out_features, in_features = weight.shape
    dtype, device = like.weight.dtype, like.weight.device
    if is_conv1d(like):
        with torch.device("meta"):  # Conv1D(nf, nx) has weight (in, out); real values are set below
            layer = type(like)(out_features, in_features)
        layer.weight = nn.Parameter(weight.detach().t().to(device=device, dtype=dtype).contiguous(),
                                    requires_grad=False)
        bias = torch.zeros(out_features, dtype=weight.dtype, device=weight.device) if bias is None else bias
        layer.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).contiguous(), requires_grad=False)
        return layer
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().to(device=device, dtype=dtype).contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).contiguous(), requires_grad=False)
    return layer


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace every reference to ``old`` among the submodules of ``root`` by ``new``."""
    for parent in root.modules():
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


def shrink_rows(root: nn.Module, module: nn.Module, rows: torch.Tensor) -> nn.Module:
    """Keep output ``rows`` of ``module`` (weight rows and bias entries); returns the new layer."""
    index = rows.to(module.weight.device)
    weight = linear_weight(module).index_select(0, index)
    bias = None if module.bias is None else module.bias.detach().index_select(0, index)
    new = _new_linear(weight, bias, module)
    _replace(root, module, new)
    return new


def apply_solution(
    root: nn.Module,
    structure: Structure,
    support: Sequence[int],
    weights: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> None:
    """Prune ``structure`` inside ``root`` down to the groups in ``support``.

    Args:
        root: the module that contains the structure's layers (a block or the whole model).
        structure: consumer, groups and producers.
        support: kept group ids (sorted).
        weights: ``(m, p_in)`` = ``(out, in)`` optimal consumer weight for ``support`` (zeros in pruned columns).
        bias: re-fit consumer bias ``(m,)``, or None to keep the current bias.
    """
    kept = sorted(int(g) for g in support)
    if not kept:
        raise ValueError("support: at least one group must be kept")
    consumer = structure.consumer
    if tuple(weights.shape) != linear_shape(consumer):
        raise ValueError(f"weights: expected shape {linear_shape(consumer)}, got {tuple(weights.shape)}")
    columns = rows_for(structure.groups, kept).to(weights.device)
    new_weight = weights.index_select(1, columns)
    new_bias = bias if bias is not None else (None if consumer.bias is None else consumer.bias.detach())
    _replace(root, consumer, _new_linear(new_weight, new_bias, consumer))
    for producer in structure.producers:
        shrink_rows(root, producer.module, producer.kept_rows(kept))
    if structure.on_resize is not None:
        structure.on_resize(len(kept))


def resize_empty(root: nn.Module, structure: Structure, keep: int) -> None:
    """Shrink ``structure`` to its first ``keep`` groups, values irrelevant (used before reloading)."""
    apply_solution(root, structure, range(keep), structure.weight())
