"""``serial``: every call in this process, one after another (the reference the others match)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from osscar_opt.executors.base import DEFAULT_RETRIES, Call, Executor, OnResult


class SerialExecutor(Executor):
    """In-process, in order; a worker cannot die without this process."""

    name = "serial"

    def __init__(self, workers: int = 1, retries: int = DEFAULT_RETRIES) -> None:
        super().__init__(workers, retries)

    def run(self, function: Callable[..., dict[str, Any]], calls: Sequence[Call], on_result: OnResult) -> None:
        for index, arguments in calls:
            on_result(index, function(*arguments))
