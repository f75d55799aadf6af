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

from osscar_opt.executors.base import EXECUTORS, Executor, make_executor

__all__ = ["EXECUTORS", "Executor", "make_executor"]
