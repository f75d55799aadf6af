"""Save and reload pruned models: safetensors weights + a small JSON, written atomically.

A saved model is a folder with

* ``model.safetensors``: the state dict (tensors that share storage, e.g. tied embeddings, are
  written once; the aliases are listed in the JSON),
* ``osscar_pruned.json``: ``{"format": ..., "family": ..., "aliases": {...}, ...}`` plus whatever
  the family's ``export`` returned (per-layer dimensions),
* family files (``config.json`` for transformers models).

Families are modules with ``handles(model) -> bool``, ``export(model) -> (meta, state_dict)`` and
``rebuild(meta, directory) -> model`` (and optionally ``write_extra(model, directory)``);
``rebuild`` reads the weights with :func:`read_state_dict`. Nothing is pickled. The folder is
written under a temporary name next to the destination and renamed into place, so a crash never
leaves a half-written model at the destination.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

FORMAT = "osscar_opt.pruned_model"
META_FILE = "osscar_pruned.json"
WEIGHTS_FILE = "model.safetensors"
FAMILIES = {
    "transformers": "osscar_opt.adapters.transformers_io",
    "torchvision": "osscar_opt.adapters.torchvision_io",
}


def _family_module(name: str) -> ModuleType | None:
    """The family module, or None when it is not part of this installation."""
    module_name = FAMILIES[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
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


def _split_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one; return the rest and alias -> source."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        unique[key] = tensor.detach().to("cpu").contiguous()
    return unique, aliases


def _check_destination(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory: {directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / META_FILE).is_file():
        raise ValueError(f"directory: {directory} is a non-empty folder that is not a saved pruned model")


def save_pruned(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write ``model`` to ``directory`` atomically (replacing an earlier saved model there).

    ``tokenizer`` (anything with ``save_pretrained``) is written into the same folder.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    _check_destination(directory)
    family, module = _family_for(model)
    meta, state = module.export(model)
    tensors, aliases = _split_aliases(state)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file(tensors, str(temporary / WEIGHTS_FILE), metadata={"format": FORMAT})
        if hasattr(module, "write_extra"):
            module.write_extra(model, temporary)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(temporary))
        document = {"format": FORMAT, "family": family, "aliases": aliases, **meta}
        (temporary / META_FILE).write_text(json.dumps(document, indent=1, sort_keys=True))
        _replace_folder(temporary, directory)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    return directory


def _replace_folder(source: Path, destination: Path) -> None:
    """Move ``source`` to ``destination``; an existing saved model there is replaced."""
    if not destination.exists():
        os.replace(source, destination)
        return
    old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
    os.replace(destination, old)
    os.replace(source, destination)
    shutil.rmtree(old)


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON document of a saved model; a missing or foreign folder raises ValueError."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ValueError(f"directory: {directory} is not a saved pruned model (no {META_FILE})")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"directory: {path} is not valid JSON ({exc})") from exc
    if document.get("format") != FORMAT or document.get("family") not in FAMILIES:
        raise ValueError(f"directory: {path} is not an osscar_opt pruned model description")
    return document


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The saved state dict with tied aliases restored (CPU tensors)."""
    from safetensors.torch import load_file

    meta = read_meta(directory)
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    for alias, source in meta.get("aliases", {}).items():
        state[alias] = state[source]
    return state


def load_pruned(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned` with stock classes and its saved dimensions."""
    meta = read_meta(directory)
    module = _family_module(meta["family"])
    if module is None:
        raise ValueError(f"directory: family {meta['family']!r} is not available in this installation")
    return module.rebuild(meta, Path(directory))
