"""The layer-problem file: a :class:`~osscar_opt.problem.LayerProblem` as safetensors (no pickle).

Tensors (CPU, float64 / int64): ``H``, ``G``, ``group_of_column`` and, when present, ``xtx_diag``,
``weight``, ``keep`` (a 0-d int64: the budget the pipeline solved it with), ``input_var`` and the
held-out moments ``heldout.{xtx,xty,anchor}``. String metadata: ``format`` (:data:`FORMAT_NAME`),
``version`` (:data:`FORMAT_VERSION`), ``c0``, ``lam``, ``has_bias_column``, ``meta`` (JSON) and the
held-out scalars. Files are replaced atomically; a foreign, corrupt or inconsistent file is a
ValueError that names it.

This module knows the format only: it turns a problem's attributes into tensors and metadata and
back into the keyword arguments of the ``LayerProblem`` constructor, which validates them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from osscar_opt.moments import Moments

FORMAT_NAME = "osscar_opt.LayerProblem"
FORMAT_VERSION = "1"


def encode(problem: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (CPU, float64 / int64) and string metadata of ``problem``'s file form."""
    tensors = {
        "H": problem.H.detach().to("cpu", torch.float64).contiguous(),
        "G": problem.G.detach().to("cpu", torch.float64).contiguous(),
        "group_of_column": problem.group_of_column.detach().to("cpu", torch.int64).contiguous(),
    }
    for name in ("xtx_diag", "weight", "input_var"):
        value = getattr(problem, name)
        if value is not None:
            tensors[name] = value.detach().to("cpu", torch.float64).contiguous()
    if problem.keep is not None:
        tensors["keep"] = torch.tensor(int(problem.keep), dtype=torch.int64)
    if problem.heldout is not None:
        for key in ("xtx", "xty", "anchor"):
            tensors[f"heldout.{key}"] = getattr(problem.heldout, key).detach().to("cpu", torch.float64).contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "c0": repr(problem.c0),
        "lam": repr(problem.lam),
        "has_bias_column": "1" if problem.has_bias_column else "0",
        "meta": json.dumps(problem.meta, sort_keys=True),
    }
    if problem.heldout is not None:
        metadata["heldout.y_square"] = repr(problem.heldout.y_square)
        metadata["heldout.rows"] = repr(float(problem.heldout.rows))
        metadata["heldout.inputs"] = str(problem.heldout.inputs)
    return tensors, metadata


def write(problem: Any, path: str | os.PathLike) -> None:
    """Write ``problem`` to ``path``; the file is replaced atomically."""
    from safetensors.torch import save_file

    tensors, metadata = encode(problem)
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def to_bytes(problem: Any) -> bytes:
    """``problem``'s file form as bytes (how a batch sends in-memory problems to workers)."""
    from safetensors.torch import save

    return save(*encode(problem))


def read_bytes(data: bytes, name: str = "<bytes>") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of :func:`to_bytes`'s form; ``name`` stands for the source in errors."""
    from safetensors.torch import load

    with unreadable(name, "data"):
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < 8:
            raise ValueError("too short for a safetensors header")
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
        check_format(metadata, name)
        tensors = load(data)
    return tensors, metadata


def check_format(metadata: dict[str, str], name: object) -> None:
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"path: {name} is not an osscar_opt LayerProblem file")
    if metadata.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"path: {name} has format version {metadata.get('version')!r}, "
            f"this osscar_opt reads version {FORMAT_VERSION}"
        )


def read(path: str | os.PathLike, names: set[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (all, or those in ``names``) and metadata of a problem file; ValueError naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: no such problem file: {path}")
    with unreadable(path), safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        check_format(metadata, path)
        tensors = {key: handle.get_tensor(key) for key in handle.keys()  # noqa: SIM118
                   if names is None or key in names}
    return tensors, metadata


def peek(path: str | os.PathLike) -> dict[str, Any]:
    """``{"name", "kind", "groups", "keep"}`` of a saved problem, read without its matrices
    (no ``H`` is loaded or factored); a foreign or corrupt file raises ValueError."""
    path = Path(path)
    tensors, metadata = read(path, {"group_of_column", "keep"})
    try:
        meta = json.loads(metadata.get("meta", "{}"))
        labels = tensors["group_of_column"]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"path: {path} is not a readable osscar_opt LayerProblem file ({exc!r})") from exc
    groups = int(labels.max()) + 1 if labels.numel() else 0
    return {"name": str(meta.get("name", path.stem)), "kind": str(meta.get("kind", "")), "groups": groups,
            "keep": saved_keep(path, tensors.get("keep"))}


def constructor_arguments(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: object) -> dict[str, Any]:
    """The ``LayerProblem`` constructor's arguments from the file form (``H``, ``G``, ``c0``,
    ``group_of_column`` and the keywords); ``source`` names the file in errors. The constructor
    validates the values."""
    with unreadable(source):
        meta = json.loads(metadata.get("meta", "{}"))
        heldout = None
        if "heldout.xtx" in tensors:
            heldout = Moments(
                tensors["heldout.xtx"], tensors["heldout.xty"], float(metadata["heldout.y_square"]),
                float(metadata["heldout.rows"]), tensors["heldout.anchor"], int(metadata["heldout.inputs"]),
            )
        arguments = {
            "H": tensors["H"], "G": tensors["G"], "c0": float(metadata["c0"]),
            "group_of_column": tensors["group_of_column"], "lam": float(metadata["lam"]),
            "xtx_diag": tensors.get("xtx_diag"), "weight": tensors.get("weight"),
            "has_bias_column": metadata["has_bias_column"] == "1", "meta": meta,
            "input_var": tensors.get("input_var"), "heldout": heldout,
        }
    if arguments["group_of_column"].dtype != torch.int64:
        raise ValueError(f"path: {source} has group_of_column of dtype {arguments['group_of_column'].dtype}, "
                         "expected int64")
    H = arguments["H"]
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"path: {source} holds an invalid problem: H: expected a square (p, p) matrix, got shape "
                         f"{tuple(H.shape)}")
    arguments["keep"] = saved_keep(source, tensors.get("keep"))
    return arguments


@contextmanager
def unreadable(source: object, what: str = "file") -> Iterator[None]:
    """Turn any failure to parse ``source`` into ``ValueError("path: <source> is not a readable ...")``
    (an error that already names it passes unchanged)."""
    try:
        yield
    except ValueError as exc:
        if str(exc).startswith("path:"):
            raise
        raise ValueError(f"path: {source} is not a readable osscar_opt LayerProblem {what} ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ValueError(f"path: {source} is not a readable osscar_opt LayerProblem {what} ({exc})") from exc


def saved_keep(path: object, value: torch.Tensor | None) -> int | None:
    """The integer budget stored in a problem file (a 0-d int64 tensor), or None."""
    if value is None:
        return None
    if value.dtype != torch.int64 or value.dim() != 0:
        raise ValueError(f"path: {path} has a 'keep' field of dtype {value.dtype} and shape {tuple(value.shape)}, "
                         "expected a 0-d int64 tensor")
    return int(value)
