"""osscar_opt: one-shot structured pruning by combinatorial optimization (OSSCAR).

Data flows one way: model + calibration -> structures -> problem -> backend -> solution ->
surgery -> smaller model (docs/architecture.md).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LayerProblem": "osscar_opt.problem",
    "StatsAccumulator": "osscar_opt.accumulator",
    "Solution": "osscar_opt.solution",
    "PathPoint": "osscar_opt.solution",
    "solve": "osscar_opt.solving",
    "certify": "osscar_opt.certify",
    "prune": "osscar_opt.pipeline",
    "oneshot": "osscar_opt.oneshot",
    "CostTarget": "osscar_opt.budget",
    "PerLayerKeep": "osscar_opt.budget",
    "prune_vision": "osscar_opt.pipeline",
    "PruneReport": "osscar_opt.pipeline",
    "LayerRecord": "osscar_opt.pipeline",
    "keep_count": "osscar_opt.budget",
    "save_pruned": "osscar_opt.io",
    "load_pruned": "osscar_opt.io",
    "load_sentence_transformer": "osscar_opt.io.sentence",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'osscar_opt' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    # Cache the function: importing a submodule of the same name (osscar_opt.certify) would
    # otherwise leave the package attribute pointing at the module.
    globals()[name] = value
    return value
