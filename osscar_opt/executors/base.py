"""The executor interface and registry (docs/architecture.md, "Batches")."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

# (index, arguments) of one call; the executor calls ``function(*arguments)`` in a worker.
Call = tuple[int, tuple[Any, ...]]
# Receives (index, result) as each call finishes, in completion order.
OnResult = Callable[[int, dict[str, Any]], None]

DEFAULT_RETRIES = 2  # re-runs of a call whose worker died (the call's own errors are not retried)


def died_row(attempts: int, reason: str) -> dict[str, Any]:
    """The result of a call whose worker died on every attempt."""
    return {"status": "error", "error": f"the worker died {attempts} times running this task ({reason})",
            "error_type": "WorkerDied"}


class Executor(ABC):
    """Runs calls of one picklable top-level function in workers and reports results as they come.

    Attributes:
        name: registry name.
        workers: how many calls run at once.
        retries: re-runs of a call whose worker died.
    """

    name: ClassVar[str]

    def __init__(self, workers: int = 1, retries: int = DEFAULT_RETRIES) -> None:
        self.workers = check_workers(workers)
        self.retries = check_retries(retries)

    @abstractmethod
    def run(self, function: Callable[..., dict[str, Any]], calls: Sequence[Call], on_result: OnResult) -> None:
        """Call ``function(*arguments)`` for every ``(index, arguments)``; ``on_result(index, row)``
        for each as it finishes. Must not raise for a failed call: a call whose worker died more than
        ``retries`` times is reported with :func:`died_row`."""

    def share(self, key: str, data: bytes) -> Any:
        """A handle for ``data`` (a problem's bytes) to put in call arguments; executors with an
        object store put it there once and pass the reference."""
        return data

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release workers (idempotent)."""

    def describe(self) -> str:
        return f"{self.name} ({self.workers} worker{'s' if self.workers != 1 else ''})"

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_workers(value: Any) -> int:
    """A positive integer number of workers, else ValueError naming ``workers``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"workers: expected a positive integer, got {value!r}")
    return value


def check_retries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"retries: expected an integer >= 0, got {value!r}")
    return value


def default_workers() -> int:
    """The CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
