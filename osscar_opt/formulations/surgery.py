"""Surgery: write a solution back into the network and shrink its modules in place.

The consumer gets the re-fit weights of the kept columns (and the re-fit bias, if any); every
producer keeps only the rows of the kept groups; ``Structure.on_resize`` updates head counts and
sizes so the stock forward code runs on the smaller modules. Modules are edited in place
(parameters and buffers replaced by slices, size attributes updated), so references held by the
model, its hooks and its adapters stay valid. Handled: ``nn.Linear``, transformers' ``Conv1D``,
dense and depthwise ``nn.Conv2d``, ``nn.BatchNorm2d``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from osscar_opt.formulations.layers import is_conv1d, is_depthwise, kernel_area, matrix_shape
from osscar_opt.formulations.structures import Structure, rows_for


def _parameter(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """A parameter holding ``value`` in ``like``'s device and dtype, with ``like``'s requires_grad."""
    value = value.detach().to(device=like.device, dtype=like.dtype).contiguous().clone()
    return nn.Parameter(value, requires_grad=like.requires_grad)


def keep_output_rows(module: nn.Module, rows: torch.Tensor) -> None:
    """Keep only output ``rows`` (int64) of a producer: Linear / Conv1D rows, conv output channels
    (a depthwise conv also shrinks its inputs and groups), BatchNorm entries."""
    index = rows.to(torch.int64)
    count = int(index.numel())
    if isinstance(module, nn.BatchNorm2d):
        if module.weight is not None:
            module.weight = _parameter(module.weight[index.to(module.weight.device)], module.weight)
            module.bias = _parameter(module.bias[index.to(module.bias.device)], module.bias)
        if module.running_mean is not None:
            module.running_mean = module.running_mean[index.to(module.running_mean.device)].clone()
            module.running_var = module.running_var[index.to(module.running_var.device)].clone()
        module.num_features = count
        return
    if isinstance(module, nn.Conv2d):
        depthwise = is_depthwise(module)
        if module.groups > 1 and not depthwise:
            raise ValueError(f"conv: grouped producers (groups={module.groups}) are not supported")
        module.weight = _parameter(module.weight[index.to(module.weight.device)], module.weight)
        module.out_channels = count
        if depthwise:
            module.in_channels = module.groups = count
    elif is_conv1d(module):
        module.weight = _parameter(module.weight[:, index.to(module.weight.device)], module.weight)
        module.nf = count
    elif isinstance(module, nn.Linear):
        module.weight = _parameter(module.weight[index.to(module.weight.device)], module.weight)
        module.out_features = count
    else:
        raise ValueError(f"producer: cannot cut rows of a {type(module).__name__}")
    if module.bias is not None:
        module.bias = _parameter(module.bias[index.to(module.bias.device)], module.bias)


def set_consumer(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give a consumer its new weight as a matrix ``(m, p_kept)`` and, when given, a bias ``(m,)``.

    A conv consumer's matrix is reshaped to ``(C_out, p_kept / (kh*kw), kh, kw)``; a bias-free
    consumer gains a bias parameter when ``bias`` is given.
    """
    m, p = weight.shape
    if m != matrix_shape(module)[0]:
        raise ValueError(f"weights: expected {matrix_shape(module)[0]} rows, got {m}")
    if isinstance(module, nn.Conv2d):
        area = kernel_area(module)
        if p % area:
            raise ValueError(f"weights: {p} columns are not whole channels of a {module.kernel_size} kernel")
        module.weight = _parameter(weight.reshape(m, p // area, *module.kernel_size), module.weight)
        module.in_channels = p // area
    elif is_conv1d(module):
        module.weight = _parameter(weight.t(), module.weight)
        module.nx = p
    else:
        module.weight = _parameter(weight, module.weight)
        module.in_features = p
    if bias is not None:
        module.bias = _parameter(bias, module.weight if module.bias is None else module.bias)


def _checked_columns(structure: Structure, support: Sequence[int],
                     weights: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The sorted kept groups and their consumer columns; an empty support where the structure
    cannot be emptied, or weights of the wrong shape, are refused."""
    kept = sorted(int(g) for g in support)
    if not kept and not structure.can_empty:
        raise ValueError(f"support: at least one group of {structure.name} must be kept (its family's forward "
                         "code cannot drop the sublayer)")
    if tuple(weights.shape) != matrix_shape(structure.consumer):
        raise ValueError(f"weights: expected shape {matrix_shape(structure.consumer)}, got {tuple(weights.shape)}")
    return kept, rows_for(structure.groups, kept).to(weights.device)


def apply_solution(
    structure: Structure,
    support: Sequence[int],
    weights: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> None:
    """Prune ``structure`` down to the groups in ``support``, in place.

    Args:
        structure: consumer, groups and producers.
        support: kept group ids; empty where ``structure.can_empty``: the sublayer is replaced by
            its (re-fit) bias, :mod:`~osscar_opt.formulations.empty`.
        weights: ``(m, p)`` optimal consumer weight for ``support`` as a matrix (zeros in pruned columns).
        bias: re-fit consumer bias ``(m,)``, or None to keep the current bias.
    """
    kept, columns = _checked_columns(structure, support, weights)
    if not kept:  # the whole sublayer goes: its output is the (re-fit) bias, or zero
        current = structure.consumer.bias
        structure.on_empty(bias if bias is not None else None if current is None else current.detach())
        return
    set_consumer(structure.consumer, weights.index_select(1, columns), bias)
    for producer in structure.producers:
        keep_output_rows(producer.module, producer.kept_rows(kept))
    if structure.on_resize is not None:
        structure.on_resize(len(kept))


def mask_solution(
    structure: Structure,
    support: Sequence[int],
    weights: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> None:
    """Give ``structure``'s consumer the re-fit weights of ``support`` and zeros in every pruned
    column, without cutting anything: the model then computes what :func:`apply_solution` would
    leave (the pruned groups' producers feed only this consumer), at the dense model's cost.
    ``weights``: ``(m, p)`` as for :func:`apply_solution`; ``bias``: the re-fit bias or None."""
    _, columns = _checked_columns(structure, support, weights)
    masked = torch.zeros_like(weights)
    masked[:, columns] = weights[:, columns]
    set_consumer(structure.consumer, masked, bias)


def resize_empty(structure: Structure, keep: int) -> None:
    """Shrink ``structure`` to its first ``keep`` groups (of every block, :meth:`Structure.first_groups`),
    values irrelevant (used before reloading)."""
    apply_solution(structure, structure.first_groups(keep), structure.weight())
