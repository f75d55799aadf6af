"""What a :func:`~osscar_opt.pipeline.prune` run returns: one :class:`LayerRecord` per pruned layer
and the :class:`PruneReport` that holds them with the run's settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

INCOMPLETE = "incomplete"
"""``model.osscar_state`` after :func:`~osscar_opt.pipeline.prune` failed part-way: some stages are
cut in place, the rest are not; :func:`osscar_opt.save_pruned` refuses such a model (reload the
dense one and prune again)."""


@dataclass
class LayerRecord:
    """What happened to one consumer layer (one row of the JSON report).

    Losses are the layer problem's (squared reconstruction error plus ridge term, summed over
    calibration rows); ``relative_loss`` is ``loss / c0`` (``c0``: the loss of keeping nothing).
    ``damp`` is the ridge the kept weights were re-fit with. Under ``damp="auto"``,
    ``heldout_relative_loss`` is the held-out samples' error of weights fit on the other samples,
    over the held-out error of keeping nothing, and ``heldout_candidate`` names the local-search
    candidate the held-out rows chose (None for backends with one candidate).
    """

    stage: int
    name: str
    kind: str
    groups: int
    keep: int
    kept: list[int]
    loss: float
    dense_loss: float
    relative_loss: float
    backend: str
    status: str
    solve_seconds: float
    calibration_seconds: float
    damp: float = 0.0
    heldout_relative_loss: float | None = None
    heldout_candidate: str | None = None


@dataclass
class PruneReport:
    """Per-layer records of a :func:`~osscar_opt.pipeline.prune` run, its settings and total wall
    time (seconds)."""

    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "seconds": self.seconds, "layers": [asdict(r) for r in self.layers]}

    @property
    def target_met(self) -> bool | None:
        """Whether the pruned model meets its cost target (measured after pruning); None without a target."""
        allocation = self.settings.get("allocation") or {}
        return None if "target_met" not in allocation else bool(allocation["target_met"])

    def settings_line(self) -> str:
        """The budget, the calibration and the fit settings, in one line."""
        settings = self.settings
        present = {record.kind for record in self.layers}
        budget = settings.get("budgets")
        if isinstance(budget, dict) and "target" in budget:
            what = f"target {budget['target']} {budget['value']:g} ({budget.get('allocation', 'curves')} allocation)"
        elif isinstance(budget, dict):
            what = "sparsity " + ", ".join(f"{kind} {value:g}" for kind, value in sorted(budget.items())
                                            if value and kind in present)
        else:
            what = f"budget {budget}"
        shape = " x ".join(str(n) for n in settings.get("sample_shape", []))
        return (f"{what}; {settings.get('samples')} calibration samples of {shape}; target {settings.get('target')}, "
                f"damp {settings.get('damp')}, objective {settings.get('objective')}")

    def summary(self) -> str:
        """A few readable lines: what was pruned, how, per structure kind what was kept and lost,
        and a cost target's outcome."""
        settings = self.settings
        backends = sorted({record.backend for record in self.layers}) or [str(settings.get("backend"))]
        lines = [f"{settings.get('architecture', 'model')}: {len(self.layers)} layers pruned with "
                 f"{', '.join(backends)} in {self.seconds:.1f} s", self.settings_line()]
        for kind in sorted({record.kind for record in self.layers}):
            records = [record for record in self.layers if record.kind == kind]
            shares = [record.keep / record.groups for record in records]
            losses = [record.relative_loss for record in records]
            heldout = [r.heldout_relative_loss for r in records if r.heldout_relative_loss is not None]
            line = (f"{kind}: {len(records)} layers, kept {min(shares):.0%}-{max(shares):.0%} of their groups, "
                    f"mean relative loss {sum(losses) / len(losses):.4f}")
            if heldout:
                line += f" (held-out {sum(heldout) / len(heldout):.4f})"
            lines.append(line)
        allocation = settings.get("allocation") or {}
        if "target_met" in allocation:
            lines.append(allocation.get("missed") or f"target {allocation['target']} {allocation['value']:g} met")
        if allocation.get("at_floor"):
            lines.append(f"{len(allocation['at_floor'])} structures at their smallest allowed keep")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"PruneReport({len(self.layers)} layers, backend={self.settings.get('backend')!r}, "
                f"budgets={self.settings.get('budgets')!r}, seconds={self.seconds:.1f})")
