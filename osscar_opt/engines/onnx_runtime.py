"""An ONNX file run by ONNX Runtime (CPU): outputs and latency per batch."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from osscar_opt.engines.timing import spread


def session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``path`` with ``threads`` intra-op threads (CPU); a file
    ONNX Runtime cannot load is a ValueError naming it."""
    from osscar_opt._extras import require

    ort = require("onnxruntime", "deploy", "engine onnxruntime")
    if not Path(path).is_file():
        raise ValueError(f"model: {path} is not a file")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own classes for unreadable files
        raise ValueError(f"model: ONNX Runtime cannot load {path}: {exc}") from exc


def run(sess: Any, inputs: Mapping[str, Any]) -> np.ndarray:
    """The first output of ``sess`` on ``inputs`` (tensors or arrays by input name)."""
    feed = {name: np.asarray(value.numpy() if hasattr(value, "numpy") else value) for name, value in inputs.items()}
    return sess.run(None, feed)[0]


def latency(sess: Any, inputs: Mapping[str, Any], *, repeats: int = 7, threads: int | None = None) -> dict[str, Any]:
    """Milliseconds per batch of ``sess`` on ``inputs``: median and range of ``repeats`` runs after one warm-up."""
    feed = {name: np.asarray(value.numpy() if hasattr(value, "numpy") else value) for name, value in inputs.items()}
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    shape = next(iter(feed.values())).shape
    return {"engine": "onnxruntime", "threads": int(threads or os.cpu_count() or 1), "batch": list(shape),
            "repeats": repeats, "latency_ms": spread(times)}
