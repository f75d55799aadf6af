"""osscar_opt: one-shot structured pruning by combinatorial optimization (OSSCAR).

Data flows one way: model + calibration -> structures -> problem -> backend -> solution ->
surgery -> smaller model (docs/architecture.md).
"""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType
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
    "export": "osscar_opt.deploy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'osscar_opt' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # cached: the next lookup does not come here
    return value


class _Package(ModuleType):
    """The package module. Importing a submodule sets the package attribute of its name to the
    module (``import osscar_opt.oneshot`` would make ``osscar_opt.oneshot`` the module, not the
    function): for the exports that share their module's name (``certify``, ``oneshot``), the
    attribute becomes the function instead, whatever was imported first."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, ModuleType) and _EXPORTS.get(name) == value.__name__ and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
