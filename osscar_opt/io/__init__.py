"""Save and reload pruned models with stock library classes (``save_pruned`` / ``load_pruned``).

Families are modules of this package with ``handles(model) -> bool``, ``export(model) ->
(meta, state_dict)``, ``write_files(model, folder)`` and ``rebuild(meta, state_dict, folder) ->
model``; :mod:`osscar_opt.io.folder` writes and reads the folder atomically. Nothing is pickled.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from osscar_opt.io.folder import META_FILE, WEIGHTS_FILE, check_aliases_tied, read_state_dict, write_folder
from osscar_opt.io.folder import read_meta as _read_meta

FAMILIES = {
    "transformers": "osscar_opt.io.transformers",
    "torchvision": "osscar_opt.io.torchvision",
}

__all__ = ["FAMILIES", "META_FILE", "WEIGHTS_FILE", "load_pruned", "read_meta", "read_state_dict", "save_pruned"]


def _family_module(name: str) -> ModuleType | None:
    """The family module, or None when its library is not installed."""
    module_name = FAMILIES[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or exc.name == name:
            return None
        raise


def _family_for(model: nn.Module) -> tuple[str, ModuleType]:
    for name in FAMILIES:
        module = _family_module(name)
        if module is not None and module.handles(model):
            return name, module
    raise ValueError(
        f"model: cannot save a {type(model).__name__}; supported families: "
        + ", ".join(n for n in FAMILIES if _family_module(n) is not None)
    )


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON document of a saved model; a missing or foreign folder raises ValueError."""
    return _read_meta(directory, tuple(FAMILIES))


def kept_groups(report: Any) -> dict[str, dict[str, Any]]:
    """``{consumer layer: {"kind", "groups", "kept"}}`` from a prune report (object or its dict);
    ``kept`` are the dense model's group ids (heads, KV groups, neurons, channels), ascending."""
    layers = report.to_dict()["layers"] if hasattr(report, "to_dict") else report["layers"]
    return {
        str(layer["name"]): {"kind": layer["kind"], "groups": int(layer["groups"]),
                             "kept": sorted(int(i) for i in layer["kept"])}
        for layer in layers
    }


def save_pruned(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None, report: Any = None) -> Path:
    """Write ``model`` to ``directory`` atomically (replacing an earlier saved model there).

    ``tokenizer`` (anything with ``save_pretrained``) is written into the same folder; ``report``
    (the :class:`~osscar_opt.pipeline.PruneReport` of the run, or its dict) adds the kept group
    ids of every pruned layer to ``osscar_pruned.json`` (``"kept"``), and the name of the calibration text
    when the report's settings hold one (``"calibration_text"``). A model whose pruning failed
    part-way (``model.osscar_state == "incomplete"``) is refused.
    """
    if getattr(model, "osscar_state", None) == "incomplete":
        raise ValueError(
            "model: its pruning failed part-way (model.osscar_state == 'incomplete'): some blocks are cut and "
            "others are not; reload the dense model and prune again"
        )
    family, module = _family_for(model)
    meta, state = module.export(model)
    if report is not None:
        meta["kept"] = kept_groups(report)
        settings = report.get("settings", {}) if isinstance(report, dict) else getattr(report, "settings", {})
        if isinstance(settings.get("calibration_text"), str):  # named by `osscar eval` as the seen text
            meta["calibration_text"] = settings["calibration_text"]

    def write_files(folder: Path) -> None:
        module.write_files(model, folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))

    return write_folder(Path(directory), state, {"family": family, **meta}, write_files)


def load_pruned(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned` with stock classes and its saved dimensions.

    Nothing in the folder is trusted: dimensions above the dense model's, weights that do not fit,
    non-finite values and tied-weight aliases the rebuilt model does not tie are ValueErrors naming
    ``directory`` and the file.
    """
    meta = read_meta(directory)
    module = _family_module(meta["family"])
    if module is None:
        raise ValueError(f"directory: family {meta['family']!r} is not available in this installation")
    state = read_state_dict(directory, meta)
    try:
        model = module.rebuild(meta, state, Path(directory))
    except ValueError as exc:
        if str(exc).startswith("directory:"):
            raise
        raise ValueError(f"directory: {Path(directory) / META_FILE} does not describe a model that can be "
                         f"rebuilt: {exc}") from exc
    check_aliases_tied(model, directory, meta)
    return model
