"""``processes``: a pool of local worker processes.

Workers are spawned (not forked: a forked copy of a process that already ran torch's thread pools
can deadlock) and each runs torch on ``max(1, cores // workers)`` threads, so that the workers do
not fight over the cores. At most ``workers`` calls are in flight, so when a worker dies (killed,
out of memory) the calls it may have been running are known: the pool is rebuilt and they are
submitted again, each at most ``retries`` more times.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from osscar_opt.executors.base import DEFAULT_RETRIES, Call, Executor, OnResult, default_workers, died_row


def _initialize(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class ProcessExecutor(Executor):
    """A local process pool; a worker that dies is replaced and its calls run again."""

    name = "processes"

    def __init__(self, workers: int = 2, retries: int = DEFAULT_RETRIES) -> None:
        super().__init__(workers, retries)
        self.threads = max(1, default_workers() // self.workers)
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0  # pools rebuilt after a worker died

    def _fresh_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_initialize, initargs=(self.threads,))
        return self._pool

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (empty before the first call)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return sorted(processes)

    def run(self, function: Callable[..., dict[str, Any]], calls: Sequence[Call], on_result: OnResult) -> None:
        waiting: deque[Call] = deque(calls)
        attempts: Counter[int] = Counter()
        running: dict[Future, Call] = {}

        def settle(future: Future) -> bool:
            """Report a finished call, or queue it again when its worker died; True when it died."""
            index, arguments = running.pop(future)
            try:
                result = future.result()
            except BrokenProcessPool as exc:
                attempts[index] += 1
                if attempts[index] > self.retries:
                    on_result(index, died_row(attempts[index], " ".join(str(exc).split()) or "process pool broken"))
                else:
                    waiting.appendleft((index, arguments))
                return True
            except Exception as exc:  # noqa: BLE001 - e.g. an argument that cannot be sent
                on_result(index, {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                                  "error_type": type(exc).__name__})
                return False
            on_result(index, result)
            return False

        while waiting or running:
            pool = self._fresh_pool()
            refused = False
            while waiting and len(running) < self.workers:
                call = waiting.popleft()
                try:
                    running[pool.submit(function, *call[1])] = call
                except BrokenProcessPool:  # broke between two submissions
                    waiting.appendleft(call)
                    refused = True
                    break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = any([settle(future) for future in done])
            if broken or refused:
                # every call of a broken pool fails: settle them all, then start a new pool
                for future in wait(running).done:
                    settle(future)
                self._replace_pool()

    def _replace_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self.restarts += 1

    def close(self) -> None:
        """Stop the workers at once (a call still running, e.g. after Ctrl-C, is abandoned)."""
        if self._pool is not None:
            processes = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                if process.is_alive():
                    process.terminate()
            self._pool = None
