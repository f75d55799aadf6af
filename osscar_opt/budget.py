"""Budgets: how many groups of a structure are kept.

One rule, used by the pipeline, ``osscar solve`` and ``osscar certify``: at sparsity ``s`` (the
fraction of groups *removed*) a structure of ``n`` groups loses ``round(s * n)`` groups and keeps
the rest, at least one (:func:`keep_count`).

The pipeline asks a :class:`Budget` for the kept count of every structure it meets. The default,
:class:`UniformSparsity`, is a mapping from structure kind (:data:`KINDS`) to a sparsity, as the
CLI flags fill it; a per-layer allocation only has to implement :meth:`Budget.keep`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

KINDS: tuple[str, ...] = ("heads", "kv_groups", "neurons", "channels")
"""Structure kinds: attention heads, GQA key-value groups, MLP neurons, conv channels."""


def check_sparsity(value: float, name: str) -> float:
    """A fraction in ``[0, 1)``; anything else (bool, string, NaN, out of range) is a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a fraction in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}: expected a fraction in [0, 1), got {value!r}")
    return float(value)


def keep_count(num_groups: int, sparsity: float) -> int:
    """Groups kept of ``num_groups`` at ``sparsity``: ``num_groups - round(sparsity * num_groups)``, at least 1."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups: expected a positive integer, got {num_groups!r}")
    sparsity = check_sparsity(sparsity, "sparsity")
    return max(1, num_groups - int(round(sparsity * num_groups)))


@runtime_checkable
class Budget(Protocol):
    """Anything that says how many groups of one structure to keep."""

    def keep(self, name: str, kind: str, num_groups: int) -> int | None:
        """Kept groups of structure ``name`` (of ``kind``, with ``num_groups`` groups); None leaves it alone."""
        ...

    def kinds(self) -> set[str]:
        """The structure kinds this budget prunes (used to refuse a budget that prunes nothing)."""
        ...


class UniformSparsity:
    """The same sparsity for every structure of a kind: ``{"heads": 0.25, "neurons": 0.5}``.

    Kinds missing from the mapping, or at sparsity 0, are left alone.
    """

    def __init__(self, sparsity: Mapping[str, float]) -> None:
        if not isinstance(sparsity, Mapping):
            raise ValueError(f"budgets: expected a mapping of structure kind to sparsity, got {sparsity!r}")
        unknown = sorted(str(kind) for kind in sparsity if kind not in KINDS)
        if unknown:
            raise ValueError(f"budgets: unknown structure kinds {unknown}; expected some of {list(KINDS)}")
        self.sparsity = {kind: check_sparsity(value, f"budgets[{kind!r}]") for kind, value in sparsity.items()}

    def keep(self, name: str, kind: str, num_groups: int) -> int | None:
        sparsity = self.sparsity.get(kind, 0.0)
        return None if sparsity == 0.0 else keep_count(num_groups, sparsity)

    def kinds(self) -> set[str]:
        return {kind for kind, value in self.sparsity.items() if value > 0}

    def to_dict(self) -> dict[str, float]:
        return dict(self.sparsity)

    def __repr__(self) -> str:
        return f"UniformSparsity({self.sparsity})"


def as_budget(budgets: Budget | Mapping[str, float]) -> Budget:
    """A :class:`Budget` from a kind -> sparsity mapping (or a budget object, returned as is)."""
    if isinstance(budgets, Mapping):
        return UniformSparsity(budgets)
    if isinstance(budgets, Budget):
        return budgets
    raise ValueError(
        f"budgets: expected a mapping of structure kind ({', '.join(KINDS)}) to sparsity, "
        f"or an object with keep(name, kind, num_groups), got {type(budgets).__name__}"
    )
