"""``ray``: Ray tasks on a local or remote Ray cluster (the ``ray`` extra, imported on first use).

Problems travel once each through Ray's object store (their safetensors bytes, :meth:`share`);
every call is one task of one CPU. A task whose worker process dies is run again by Ray itself
(``max_retries``); a task that still fails comes back as an error row. ``address``: None or
``"auto"``: the cluster ``RAY_ADDRESS`` names, else a new local one of ``workers`` CPUs;
``"host:port"`` / ``"ray://host:port"``: that cluster, probed first so that an unreachable
address fails in seconds with its name.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from osscar_opt._extras import require
from osscar_opt.executors.base import DEFAULT_RETRIES, Call, Executor, OnResult, check_workers, default_workers

PROBE_SECONDS = 5.0


def _ray():
    return require("ray", "ray", "the 'ray' executor")


def host_and_port(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; ValueError naming ``address`` otherwise."""
    text = address[len("ray://"):] if address.startswith("ray://") else address
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address: expected 'auto', 'host:port' or 'ray://host:port', got {address!r}")
    return host.strip("[]"), int(port)


def probe(address: str, seconds: float = PROBE_SECONDS) -> None:
    """Fail fast (ValueError naming ``address``) when nothing listens there."""
    host, port = host_and_port(address)
    try:
        with socket.create_connection((host, port), timeout=seconds):
            pass
    except OSError as exc:
        raise ValueError(f"address: cannot reach the Ray cluster at {address!r} ({exc}); is a Ray head "
                         "running there (ray start --head), and is the port right?") from None


class RayExecutor(Executor):
    """Ray tasks; connects on construction (and shuts down only a cluster it started itself)."""

    name = "ray"

    def __init__(self, workers: int | None = None, retries: int = DEFAULT_RETRIES, address: str | None = None) -> None:
        if address is not None and (not isinstance(address, str) or not address):
            raise ValueError(f"address: expected 'auto', 'host:port' or 'ray://host:port', got {address!r}")
        remote = address not in (None, "auto")
        if remote:
            probe(address)  # before importing ray: an unreachable address fails at once
        ray = _ray()
        super().__init__(1 if workers is None else check_workers(workers), retries)
        self._owned = False
        if not ray.is_initialized():
            arguments: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                         "configure_logging": False}
            if remote:
                arguments["address"] = address
            elif not os.environ.get("RAY_ADDRESS"):
                arguments["num_cpus"] = default_workers() if workers is None else workers
            try:
                ray.init(**arguments)
            except Exception as exc:  # noqa: BLE001 - connection failures have many types
                raise ValueError(f"address: could not start or join a Ray cluster at {address or 'a local one'} "
                                 f"({type(exc).__name__}: {exc})") from exc
            self._owned = True
        if workers is None:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._shared: dict[str, Any] = {}
        self._remote = None

    def share(self, key: str, data: bytes) -> Any:
        if key not in self._shared:
            self._shared[key] = _ray().put(data)
        return self._shared[key]

    def run(self, function: Callable[..., dict[str, Any]], calls: Sequence[Call], on_result: OnResult) -> None:
        ray = _ray()
        task = ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=False)(function)
        pending = {task.remote(*arguments): index for index, arguments in calls}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for reference in ready:
                index = pending.pop(reference)
                try:
                    result = ray.get(reference)
                except ray.exceptions.RayError as exc:  # the worker died more than `retries` times, ...
                    message = " ".join(str(exc).split())[:500]
                    result = {"status": "error", "error": f"{type(exc).__name__}: {message}",
                              "error_type": type(exc).__name__}
                on_result(index, result)

    def close(self) -> None:
        self._shared.clear()
        if self._owned:
            _ray().shutdown()
            self._owned = False
