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
