"""Executors: where the tasks of a batch (:mod:`osscar_opt.batch`) run.

One file per executor, a name-keyed registry, one interface (:class:`~osscar_opt.executors.base.Executor`):

- ``serial`` (:mod:`.serial`): in this process, one task after another;
- ``processes`` (:mod:`.processes`): a local pool of worker processes (spawned, one torch thread each);
- ``ray`` (:mod:`.ray_tasks`): Ray tasks on a local or remote Ray cluster (the ``ray`` extra).

An executor knows no problem and no backend: it runs ``function(*arguments)`` for each call and
hands back plain data. Worker deaths are retried; a task's own errors come back as error rows
from the task function itself.
"""

from __future__ import annotations

from osscar_opt.executors.base import DEFAULT_RETRIES, Executor, default_workers

__all__ = ["EXECUTORS", "Executor", "make_executor"]


# name -> "module:Class", imported on first use (Ray's module imports ray only when it runs)
_BUILTIN = {"serial": "osscar_opt.executors.serial:SerialExecutor",
            "processes": "osscar_opt.executors.processes:ProcessExecutor",
            "ray": "osscar_opt.executors.ray_tasks:RayExecutor"}
EXECUTORS = tuple(_BUILTIN)


def _executor_class(name: str) -> type[Executor]:
    from importlib import import_module

    module, _, cls = _BUILTIN[name].partition(":")
    return getattr(import_module(module), cls)


def make_executor(executor: str | Executor = "serial", workers: int | None = None,
                  retries: int = DEFAULT_RETRIES, address: str | None = None) -> Executor:
    """An executor by name (``serial``, ``processes``, ``ray``) or the given instance.

    ``workers``: calls at once (default: 1 for ``serial``, the usable cores otherwise; for ``ray``
    with an ``address``, the cluster's CPUs). ``address`` (``ray`` only): ``"auto"`` / None (a
    local cluster, or the one ``RAY_ADDRESS`` names), ``"host:port"`` or ``"ray://host:port"``.
    """
    if isinstance(executor, Executor):
        if workers is not None or address is not None:
            raise ValueError("executor: give workers and address to the executor you built, not beside it")
        return executor
    if executor not in EXECUTORS:
        raise ValueError(f"executor: expected one of {list(EXECUTORS)} or an Executor, got {executor!r}")
    if address is not None and executor != "ray":
        raise ValueError(f"address: only the 'ray' executor takes an address, not {executor!r}")
    cls = _executor_class(executor)
    if executor == "serial":
        if workers not in (None, 1):
            raise ValueError(f"workers: the serial executor runs one task at a time, got workers={workers!r}; "
                             "use executor='processes' or 'ray' for more")
        return cls(retries=retries)
    if executor == "ray":
        return cls(workers=workers, retries=retries, address=address)
    return cls(workers=default_workers() if workers is None else workers, retries=retries)
