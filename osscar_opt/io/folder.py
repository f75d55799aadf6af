"""The saved-model folder: safetensors weights + a small JSON, written atomically.

A saved model is a folder with ``model.safetensors`` (the state dict; tensors that share
storage, e.g. tied embeddings, are written once and listed as aliases in the JSON),
``osscar_pruned.json`` (``{"format": ..., "family": ..., "aliases": {...}, ...}`` plus the
family's own description) and family files (``config.json`` for transformers models). The folder
is written under a temporary name next to the destination and renamed into place, so a crash
never leaves a half-written model at the destination. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FORMAT = "osscar_opt.pruned_model"
META_FILE = "osscar_pruned.json"
WEIGHTS_FILE = "model.safetensors"


def split_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one; return the rest (CPU) and alias -> source."""
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


def check_destination(directory: Path) -> None:
    """Refuse to write over a file or over a folder that is not a saved model."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory: {directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / META_FILE).is_file():
        raise ValueError(f"directory: {directory} is a non-empty folder that is not a saved pruned model")


def write_folder(
    directory: Path,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    write_files: Callable[[Path], None],
) -> Path:
    """Write weights, ``meta`` (JSON) and whatever ``write_files(folder)`` writes, atomically."""
    from safetensors.torch import save_file

    check_destination(directory)
    tensors, aliases = split_aliases(state)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file(tensors, str(temporary / WEIGHTS_FILE), metadata={"format": FORMAT})
        write_files(temporary)
        document = {"format": FORMAT, "aliases": aliases, **meta}
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


def read_json(path: Path) -> Any:
    """The JSON document in ``path``; invalid JSON is a ValueError naming the file."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"directory: {path} is not valid JSON ({exc})") from exc


def read_meta(directory: str | os.PathLike, families: tuple[str, ...]) -> dict[str, Any]:
    """The JSON document of a saved model; a missing or foreign folder raises ValueError."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ValueError(f"directory: {directory} is not a saved pruned model (no {META_FILE})")
    document = read_json(path)
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("family") not in families:
        raise ValueError(f"directory: {path} is not an osscar_opt pruned model description")
    return document


def read_state_dict(directory: str | os.PathLike, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The saved state dict with tied aliases restored (CPU tensors)."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"directory: no {WEIGHTS_FILE} in {directory}")
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ValueError(f"directory: {path} is not a readable safetensors file ({exc})") from exc
    for alias, source in meta.get("aliases", {}).items():
        if source not in state:
            raise ValueError(f"directory: {path} lacks {source!r}, the source of the tied weight {alias!r}")
        state[alias] = state[source]
    return state
