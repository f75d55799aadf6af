"""The Gurobi environment and its size-limited pip licence, shared by ``gurobi`` and ``cvxpy`` (solver GUROBI).

The gurobipy pip wheel ships a size-limited licence: at most :data:`LINEAR_LIMIT` variables and
linear constraints, and at most :data:`QUADRATIC_LIMIT` variables when the model has quadratic
terms; a larger model fails with Gurobi error :data:`SIZE_LIMIT_ERROR`, which the backends
translate into :class:`GurobiSizeLimitError`. Importing this module does not import gurobipy;
without gurobipy, :func:`gurobipy` raises an ImportError that names ``pip install 'osscar-opt[exact]'``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from osscar_opt._extras import require

SIZE_LIMIT_ERROR = 10010
LINEAR_LIMIT = 2000
QUADRATIC_LIMIT = 200
_RESTRICTED: dict[str, bool] = {}


class GurobiSizeLimitError(ValueError):
    """Gurobi refused the model under its size-limited licence (error 10010)."""


def gurobipy(purpose: str = "the 'gurobi' backend") -> ModuleType:
    """The gurobipy module; when it is not installed, an ImportError with the pip command (``exact`` extra).

    Only a missing gurobipy is reported so: Gurobi's own errors (licence, size limit) pass unchanged.
    """
    return require("gurobipy", "exact", purpose)


def environment(options: dict[str, Any]):
    """The Gurobi environment: ``env`` as given, or a new one with ``env_params`` (output off).

    Returns ``(env, owned)``; the caller disposes of an ``owned`` environment.
    """
    gp = gurobipy()

    if options.get("env") is not None:
        if "env_params" in options:
            raise ValueError("env: give env or env_params, not both")
        return options["env"], False
    params = options.get("env_params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"env_params: expected a dict of Gurobi parameters, got {type(params).__name__}")
    env = gp.Env(empty=True)
    env.setParam("OutputFlag", 1 if options.get("verbose") else 0)
    for key, value in params.items():
        env.setParam(key, value)
    env.start()
    return env, True


def licence_is_restricted(env) -> bool:
    """True when ``env`` carries the size-limited licence (probed once with a 201-variable QP)."""
    gp = gurobipy()

    key = "licence"  # one licence per process (the probe costs a solve, so it runs once)
    if key not in _RESTRICTED:
        with gp.Model(env=env) as probe:
            probe.Params.OutputFlag = 0
            x = probe.addMVar(QUADRATIC_LIMIT + 1, lb=0.0)
            probe.setObjective(x @ x)
            try:
                probe.optimize()
                _RESTRICTED[key] = False
            except gp.GurobiError as exc:
                if exc.errno != SIZE_LIMIT_ERROR:
                    raise
                _RESTRICTED[key] = True
    return _RESTRICTED[key]


def default_licence_is_restricted() -> bool:
    """True when the default Gurobi licence is the size-limited pip one."""
    env, _ = environment({})
    try:
        return licence_is_restricted(env)
    finally:
        env.dispose()
