"""Backend registry: name -> Backend class.

Built-in backends register themselves lazily (importing this package imports no solver). Other
packages add backends through the entry-point group ``osscar_opt.backends`` (each entry point
loads a :class:`~osscar_opt.backends.base.Backend` subclass) or by calling :func:`register`.
"""

from __future__ import annotations

import importlib
import importlib.util

from osscar_opt.backends.base import Backend, SearchResult, check_options

ENTRY_POINT_GROUP = "osscar_opt.backends"

# name -> "module:Class" for the built-in backends, imported on first use.
_BUILTIN: dict[str, str] = {
    "local-search": "osscar_opt.backends.local_search:LocalSearchBackend",
    "greedy": "osscar_opt.backends.greedy:GreedyBackend",
    "magnitude": "osscar_opt.backends.magnitude:MagnitudeBackend",
    "activation": "osscar_opt.backends.activation:ActivationBackend",
    "fluctuation": "osscar_opt.backends.fluctuation:FluctuationBackend",
    "enumerate": "osscar_opt.backends.enumerate:EnumerateBackend",
    "gurobi": "osscar_opt.backends.gurobi:GurobiBackend",
    "cvxpy": "osscar_opt.backends.cvxpy:CvxpyBackend",
    "scip": "osscar_opt.backends.scip:ScipBackend",
    "bnb": "osscar_opt.backends.bnb:BnbBackend",
}
_REGISTERED: dict[str, type[Backend]] = {}
_entry_points_loaded = False


def register(name: str, cls: type[Backend], *, replace: bool = False) -> None:
    """Register backend class ``cls`` under ``name`` (replacing an earlier registration of a plug-in).

    A built-in name (``greedy``, ``gurobi``...) is refused unless ``replace=True``: a plug-in must
    not change what a built-in name means without saying so.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and callable(getattr(cls, "solve", None))):
        raise ValueError(f"cls: expected a class with a solve(problem, keep, **options) method, got {cls!r}")
    if name in _BUILTIN and not replace:
        raise ValueError(f"name: {name!r} is a built-in backend; choose another name or pass replace=True")
    _REGISTERED[name] = cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in _REGISTERED:
            _REGISTERED[entry.name] = entry  # resolved on first use


def _builtin_exists(name: str) -> bool:
    module = _BUILTIN[name].split(":")[0]
    return importlib.util.find_spec(module) is not None


def available() -> list[str]:
    """Names of every registered backend (built-in, registered and entry points)."""
    _load_entry_points()
    names = {name for name in _BUILTIN if _builtin_exists(name)} | set(_REGISTERED)
    return sorted(names)


def get(name: str) -> type[Backend]:
    """The backend class registered under ``name``; unknown names list the available ones."""
    _load_entry_points()
    if name in _REGISTERED:
        value = _REGISTERED[name]
        if not isinstance(value, type):
            value = value.load()
            _REGISTERED[name] = value
        return value
    if isinstance(name, str) and name in _BUILTIN and _builtin_exists(name):
        module_name, class_name = _BUILTIN[name].split(":")
        return getattr(importlib.import_module(module_name), class_name)
    raise ValueError(f"backend: unknown backend {name!r}; available: {', '.join(available())}")


__all__ = ["Backend", "SearchResult", "available", "check_options", "get", "register", "ENTRY_POINT_GROUP"]
