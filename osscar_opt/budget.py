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
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, runtime_checkable

from osscar_opt.allocation_search import AllocationSearch, check_positive_int

KINDS: tuple[str, ...] = ("heads", "kv_groups", "q_heads", "neurons", "channels")
"""Structure kinds: attention heads, GQA key-value groups, query heads inside each KV group (a
budget counts them per KV group), MLP neurons, conv channels."""
DEFAULT_KINDS: tuple[str, ...] = ("heads", "kv_groups", "neurons", "channels")
"""The kinds a float budget (``oneshot``) or a :class:`CostTarget` without ``kinds`` prunes:
``q_heads`` only when named, so that a GQA model's default prune is the same as before the kind existed."""
ALIGNED_KINDS: tuple[str, ...] = ("neurons", "channels")
"""Kinds whose kept count ``multiple_of`` rounds. Heads and KV groups are left alone: a head is
already ``head_dim`` (64, 128...) columns wide, so any head count gives aligned matrix shapes."""


def check_multiple_of(value: object, name: str = "multiple_of") -> int:
    """A positive integer (the width kept neurons and channels are rounded to a multiple of)."""
    return check_positive_int(value, name)


def aligned_keep(keep: int, num_groups: int, multiple: int, name: str = "") -> int:
    """``keep`` rounded to the nearest multiple of ``multiple`` (halves up), at least ``multiple``;
    the dense width ``num_groups`` stays itself. A structure narrower than ``multiple`` is a
    ValueError naming it (no kept count of it could be a multiple)."""
    if multiple == 1 or keep >= num_groups:
        return keep
    if num_groups < multiple:
        raise ValueError(f"multiple_of: {multiple} is wider than {name or 'a structure'} ({num_groups} groups); "
                         f"choose a multiple of at most {num_groups}")
    return min(num_groups, max(multiple, multiple * math.floor(keep / multiple + 0.5)))


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

    Kinds missing from the mapping, or at sparsity 0, are left alone. ``multiple_of``: kept neurons
    and channels rounded to the nearest multiple of it (:func:`aligned_keep`; heads and KV groups
    as asked), so that matrix widths suit the kernels of serving engines.
    """

    def __init__(self, sparsity: Mapping[str, float], multiple_of: int = 1) -> None:
        if not isinstance(sparsity, Mapping):
            raise ValueError(f"budgets: expected a mapping of structure kind to sparsity, got {sparsity!r}")
        unknown = sorted(str(kind) for kind in sparsity if kind not in KINDS)
        if unknown:
            raise ValueError(f"budgets: unknown structure kinds {unknown}; expected some of {list(KINDS)}")
        self.sparsity = {kind: check_sparsity(value, f"budgets[{kind!r}]") for kind, value in sparsity.items()}
        self.multiple_of = check_multiple_of(multiple_of)

    def keep(self, name: str, kind: str, num_groups: int) -> int | None:
        sparsity = self.sparsity.get(kind, 0.0)
        if sparsity == 0.0:
            return None
        keep = keep_count(num_groups, sparsity)
        return aligned_keep(keep, num_groups, self.multiple_of, name) if kind in ALIGNED_KINDS else keep

    def kinds(self) -> set[str]:
        return {kind for kind, value in self.sparsity.items() if value > 0}

    def to_dict(self) -> dict[str, float]:
        return {**self.sparsity, **({"multiple_of": self.multiple_of} if self.multiple_of > 1 else {})}

    def __repr__(self) -> str:
        aligned = f", multiple_of={self.multiple_of}" if self.multiple_of > 1 else ""
        return f"UniformSparsity({self.sparsity}{aligned})"


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


TARGET_METRICS: tuple[str, ...] = ("macs", "params", "speedup")
ALLOCATIONS: tuple[str, ...] = ("curves", "uniform")
NORMALIZATIONS: tuple[str, ...] = ("relative", "stage")
"""Loss-curve normalizations (:mod:`osscar_opt.curves`)."""
DEFAULT_NORMALIZATION = "stage"
DEFAULT_MIN_KEEP = 0.125
"""A cost target keeps at least this fraction of every structure's groups unless told otherwise: measured on
SmolLM2 (docs/targets.md, "The floor"), a target without a floor empties whole MLPs and attention layers
where the summed layer losses say it is cheap, and the model collapses."""
"""Global targets: a fraction of the dense MACs or parameters to keep, or a latency speed-up."""


class CostTarget:
    """A global target; the pipeline chooses every structure's keep from loss curves.

    ``CostTarget("macs", 0.6)`` keeps 60% of the dense model's MACs (on the calibration batch
    shape), ``CostTarget("params", 0.7)`` 70% of its parameters, ``CostTarget("speedup", 1.5)`` a
    forward pass 1.5x as fast as the dense one on this device (latency table measured per stage
    shape, :mod:`osscar_opt.costs`). :func:`osscar_opt.pipeline.prune` computes a loss curve for every
    structure of ``kinds`` on the dense model (:mod:`osscar_opt.curves`), measures the cost of every
    keep, and allocates by dynamic programming (:mod:`osscar_opt.allocate`); :meth:`keep` then
    answers from that allocation.

    Args:
        metric: one of :data:`TARGET_METRICS`.
        value: for ``macs`` / ``params`` the fraction of the dense cost kept, in ``(0, 1]``; for
            ``speedup`` the dense latency over the pruned latency, ``>= 1``.
        kinds: structure kinds that may be pruned (default: every kind of :data:`DEFAULT_KINDS` the
            model has; ``q_heads`` only when named).
        min_keep: the fraction of each structure's groups always kept, in ``[0, 1]`` (default
            :data:`DEFAULT_MIN_KEEP`, 1/8); at least one group is always kept (a whole attention
            layer or MLP is never removed). ``0`` lets the allocation go down to one group.
        grid: keep counts per curve (every count for structures with at most ``grid`` groups).
        normalize: how curves are made comparable across layers (``osscar_opt.curves.NORMALIZATIONS``).
        reallocate: after each stage is pruned, recompute the next stage's curves on the pruned
            model's inputs and re-allocate the remaining budget over the stages not yet pruned.
        curve_swaps: swap moves at each curve point (None: 16 on layers of at most 128 groups, 0
            on larger ones, where the staged-removal path alone is used).
        latency_cache: latency tables (``speedup`` only) from the disk cache, re-validated
            (``"use"``, default), measured again and cached (``"refresh"``), or never cached
            (``"off"``); True / False stand for ``"use"`` / ``"off"``.
        latency_timer: times one forward call of a stage, ``timer(module, call) -> milliseconds``
            (``speedup`` only; default: its wall time, the GPU synchronized).
        allocation: ``"curves"`` (default): per-layer keeps from the loss curves; ``"uniform"``:
            every layer of a kind keeps the same fraction (a multiple of ``1 / grid``), the fractions
            of the kinds chosen from their summed curves: the uniform baseline at the same target.
        multiple_of: kept neurons and channels are multiples of this (the curves' keep grid holds
            only multiples, and the dense width); heads and KV groups are left alone. A target these
            widths cannot meet is refused before any layer is cut, with the smallest cost they reach.
        search: an :class:`~osscar_opt.allocation_search.AllocationSearch`: after the dynamic program,
            search keeps at the same cost scored on the model's output on its held-out samples
            (docs/targets.md, "Searching the allocation"); None (default): the program's keeps.
        allow_empty: a keep of 0 joins every structure's keep grid where the family can remove the
            whole sublayer (an attention layer or MLP: :mod:`osscar_opt.formulations.empty`), so the
            allocation (and its search) may remove it; below ``min_keep`` the grid has only 0.
            ``pipeline.prune`` refuses it for a model none of whose targeted structures can be
            emptied, naming the family. Default False.
    """

    def __init__(
        self,
        metric: str,
        value: float,
        *,
        kinds: Iterable[str] | None = None,
        min_keep: float = DEFAULT_MIN_KEEP,
        grid: int = 32,
        normalize: str = DEFAULT_NORMALIZATION,
        reallocate: bool = False,
        curve_swaps: int | None = None,
        latency_cache: bool | str = "use",
        allocation: str = "curves",
        latency_timer: Callable[..., float] | None = None,
        multiple_of: int = 1,
        search: AllocationSearch | None = None,
        allow_empty: bool = False,
    ) -> None:
        if metric not in TARGET_METRICS:
            raise ValueError(f"metric: expected one of {list(TARGET_METRICS)}, got {metric!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"target {metric}: expected a number, got {value!r}")
        if metric == "speedup" and value < 1:
            raise ValueError(
                f"target speedup: expected a speed-up >= 1 (dense latency / pruned latency), got {value!r}"
            )
        if metric != "speedup" and not 0 < value <= 1:
            raise ValueError(
                f"target {metric}: expected the fraction of the dense {metric} kept, in (0, 1], got {value!r}"
            )
        chosen = list(DEFAULT_KINDS) if kinds is None else list(kinds)
        unknown = sorted(str(kind) for kind in chosen if kind not in KINDS)
        if unknown or not chosen:
            raise ValueError(f"kinds: expected some of {list(KINDS)}, got {chosen!r}")
        if isinstance(min_keep, bool) or not isinstance(min_keep, int | float) or not 0 <= min_keep <= 1:
            raise ValueError(f"min_keep: expected a fraction in [0, 1], got {min_keep!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
            raise ValueError(f"grid: expected an integer >= 2, got {grid!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize: expected one of {list(NORMALIZATIONS)}, got {normalize!r}")
        if curve_swaps is not None and (isinstance(curve_swaps, bool) or not isinstance(curve_swaps, int)
                                        or curve_swaps < 0):
            raise ValueError(f"curve_swaps: expected a non-negative integer or None, got {curve_swaps!r}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation: expected one of {list(ALLOCATIONS)}, got {allocation!r}")
        if allow_empty is True and allocation == "uniform":
            raise ValueError("allow_empty: removes whole sublayers in some layers only; not with allocation='uniform'")
        if reallocate and allocation == "uniform":
            raise ValueError("reallocate: applies to allocation='curves' only, got allocation='uniform'")
        self.mode = allocation
        self.metric = metric
        self.value = float(value)
        self.pruned_kinds = set(chosen)
        self.min_keep = float(min_keep)
        self.grid = grid
        self.normalize = normalize
        self.reallocate = bool(reallocate)
        self.curve_swaps = curve_swaps
        self.latency_cache = check_cache_mode(latency_cache)
        if latency_timer is not None and not callable(latency_timer):
            raise ValueError(f"latency_timer: expected a function (module, call) -> milliseconds, got "
                             f"{latency_timer!r}")
        self.latency_timer = latency_timer
        self.multiple_of = check_multiple_of(multiple_of)
        if not isinstance(allow_empty, bool):
            raise ValueError(f"allow_empty: expected True or False, got {allow_empty!r}")
        self.allow_empty = allow_empty
        self.search: AllocationSearch | None = None
        self.set_search(search)
        self.allocation: dict[str, int] | None = None

    def set_search(self, search: AllocationSearch | None) -> None:
        """Search this target's allocation with ``search`` (None: the program's keeps), checked
        against the target's other settings."""
        if search is not None and not isinstance(search, AllocationSearch):
            raise ValueError(f"search: expected an AllocationSearch or None, got {search!r}")
        if search is not None and self.mode == "uniform":
            raise ValueError("search: starts from the curves' allocation, not allocation='uniform'")
        if search is not None and "q_heads" in self.pruned_kinds:
            raise ValueError("search: candidates are assembled one consumer per structure, and q_heads share theirs "
                             "with kv_groups; search without q_heads in kinds")
        if search is not None and self.reallocate:
            raise ValueError("search: searches one allocation of the whole model; reallocate would replace it "
                             "stage by stage; give one or the other")
        self.search = search

    @property
    def cost_metric(self) -> str:
        """What the costs are measured in: ``macs``, ``params`` or ``latency`` (milliseconds)."""
        return "latency" if self.metric == "speedup" else self.metric

    def capacity(self, dense_cost: float) -> float:
        """The largest total cost allowed, given the dense model's cost."""
        return dense_cost / self.value if self.metric == "speedup" else dense_cost * self.value

    def keep(self, name: str, kind: str, num_groups: int) -> int | None:
        if self.allocation is None:
            raise RuntimeError("CostTarget: no allocation yet; pass the target to osscar_opt.prune as its budget")
        keep = self.allocation.get(name)
        return None if keep is None or keep >= num_groups else keep

    def kinds(self) -> set[str]:
        return set(self.pruned_kinds)

    def to_dict(self) -> dict[str, object]:
        return {
            "target": self.metric, "value": self.value, "kinds": sorted(self.pruned_kinds),
            "min_keep": self.min_keep, "grid": self.grid, "normalize": self.normalize,
            "reallocate": self.reallocate, "allocation": self.mode, "multiple_of": self.multiple_of,
            "search": None if self.search is None else self.search.to_dict(), "allow_empty": self.allow_empty,
        }

    def __repr__(self) -> str:
        return f"CostTarget({self.metric!r}, {self.value})"


LATENCY_CACHE_MODES = ("use", "refresh", "off")


def check_cache_mode(cache: bool | str) -> str:
    """A latency cache mode of :data:`LATENCY_CACHE_MODES` (True / False stand for ``"use"`` / ``"off"``)."""
    if cache is True or cache is False:
        return "use" if cache else "off"
    if cache not in LATENCY_CACHE_MODES:
        raise ValueError(f"latency_cache: expected 'use', 'refresh' or 'off' (or True / False), got {cache!r}")
    return str(cache)


class PerLayerKeep:
    """Fixed kept-group counts per structure name, e.g. a previous run's
    ``report.settings["allocation"]["keep"]``; structures not named are left alone."""

    def __init__(self, keep: Mapping[str, int]) -> None:
        if not isinstance(keep, Mapping):
            raise ValueError(f"keep: expected a mapping of structure name to kept groups, got {keep!r}")
        for name, count in keep.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"keep[{name!r}]: expected a non-negative integer (0 empties the sublayer, where "
                                 f"its family can), got {count!r}")
        self.counts = dict(keep)

    def keep(self, name: str, kind: str, num_groups: int) -> int | None:
        count = self.counts.get(name)
        if count is not None and count > num_groups:
            raise ValueError(f"keep[{name!r}]: {count} groups, but the structure has {num_groups}")
        return None if count is None or count == num_groups else count

    def kinds(self) -> set[str]:
        return set(KINDS)

    def to_dict(self) -> dict[str, int]:
        return dict(self.counts)
