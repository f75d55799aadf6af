"""Input groups of a layer problem: which input columns are removed together.

A problem's groups are given as a list of disjoint column-index lists, or as a ``group_of_column``
vector (each column's group id, -1 for a column that is always kept). :func:`group_of_column_from`
normalizes either form to the vector and refuses anything else by name: strings, nested lists and
floats are never converted.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

GroupsLike = Sequence[Sequence[int]] | torch.Tensor | Sequence[int]


def as_group_id(value) -> int:
    """An integer group id; floats (even 2.0), strings and bools are refused, never converted."""
    if isinstance(value, bool | str | bytes):
        raise TypeError(f"group id {value!r} is not an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"group id {value!r} is not an integer") from None


def _column_indices(columns, group_id: int) -> torch.Tensor:
    """One group's column indices as a tensor; strings, nested lists and floats are refused by name."""
    if isinstance(columns, torch.Tensor):
        return columns
    if isinstance(columns, str | bytes) or not hasattr(columns, "__iter__"):
        raise ValueError(f"groups: group {group_id} must be a list of column indices, got {columns!r}")
    try:
        return torch.as_tensor([as_group_id(column) for column in columns], dtype=torch.int64)
    except TypeError as exc:
        raise ValueError(f"groups: group {group_id} must be a flat list of integer column indices ({exc})") from None


def _is_label_vector(groups) -> bool:
    """True when ``groups`` is a flat integer array (group_of_column), not a list of groups."""
    if isinstance(groups, str | bytes):
        return False
    if isinstance(groups, torch.Tensor) or hasattr(groups, "__array__"):
        return torch.as_tensor(groups).dim() == 1
    return len(groups) > 0 and not hasattr(groups[0], "__len__") and not isinstance(groups[0], torch.Tensor)


def group_of_column_from(groups: GroupsLike, num_columns: int) -> torch.Tensor:
    """Normalize ``groups`` to an int64 vector ``group_of_column`` of length ``num_columns``.

    ``groups`` is either a sequence of disjoint index sequences (group ``g`` owns the listed
    columns; unlisted columns are always kept) or an integer array of length ``num_columns`` giving
    each column's group id, with -1 for always-kept columns. Group ids must be ``0..G-1``, each used.
    """
    if _is_label_vector(groups):
        labels = torch.as_tensor(groups)
        if labels.is_floating_point() or labels.dim() != 1:
            raise ValueError("groups: an integer group_of_column vector must be 1-D integers")
        if labels.numel() != num_columns:
            raise ValueError(f"groups: group_of_column has length {labels.numel()}, expected {num_columns}")
        labels = labels.to(torch.int64).cpu()
        if (labels < -1).any():
            raise ValueError("groups: group ids must be >= -1 (-1 marks an always-kept column)")
        used = labels[labels >= 0]
        if used.numel() == 0:
            raise ValueError("groups: no prunable group (every column is -1)")
        count = int(used.max()) + 1
        present = torch.zeros(count, dtype=torch.bool)
        present[used] = True
        if not present.all():
            missing = torch.nonzero(~present).flatten()[:5].tolist()
            raise ValueError(f"groups: group ids must be contiguous 0..{count - 1}; empty groups {missing}")
        return labels
    labels = torch.full((num_columns,), -1, dtype=torch.int64)
    if isinstance(groups, str | bytes) or len(groups) == 0:
        raise ValueError(f"groups: expected a list of column-index lists or a group_of_column vector, got {groups!r}")
    for group_id, columns in enumerate(groups):
        index = _column_indices(columns, group_id)
        if index.numel() == 0:
            raise ValueError(f"groups: group {group_id} is empty")
        if index.is_floating_point():
            raise ValueError(f"groups: group {group_id} has non-integer column indices")
        index = index.to(torch.int64).flatten().cpu()
        if (index < 0).any() or (index >= num_columns).any():
            raise ValueError(
                f"groups: group {group_id} has column indices outside [0, {num_columns - 1}]"
            )
        if index.unique().numel() != index.numel():
            raise ValueError(f"groups: group {group_id} lists a column twice")
        clash = labels[index] >= 0
        if clash.any():
            column = int(index[clash][0])
            raise ValueError(
                f"groups: groups overlap: column {column} is in group {int(labels[column])} and {group_id}"
            )
        labels[index] = group_id
    return labels
