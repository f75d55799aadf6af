"""Cost model: what a structure costs at each keep count, in MACs, parameters or milliseconds.

Costs are measured on the actual modules, not derived from per-family formulas: a deep copy of the
stage is cut to ``k`` groups (surgery with the first ``k`` groups; the weights' values do not
matter) and then

* ``macs``: torch's FLOP counter over one stage call on the cost batch, divided by two (the
  same counter :func:`osscar_opt.evaluate.count_macs` reports, so targets and reports agree). Linear
  in ``k`` for every structure here (projections, attention within a head, conv channels), so it
  is measured at the full width and at ``k = 1`` and interpolated: exact, checked by a test;
* ``params``: the parameters of the cut stage (exact, linear in ``k`` the same way);
* ``latency``: the median wall time of the stage call (milliseconds; the timer of
  :func:`osscar_opt.evaluate.time_call`) at a few keeps, interpolated
  between them and made non-decreasing in ``k``, ZipLM-style. Tables are cached on disk per stage
  shape, device, dtype, batch shape and torch version (JSON under ``$OSSCAR_CACHE`` or
  ``~/.cache/osscar_opt``), so a model's identical blocks are timed once and a second run times
  nothing.

A structure's cost table holds ``cost(k) - cost(full)`` (zero or negative): how much the model's
cost changes when only this structure is cut to ``k``. The model's predicted cost is the dense
cost plus the sum over structures (exact for MACs and parameters; the latency model assumes the
savings add up, and the pipeline reports the measured latency beside the prediction).

Touches modules (copies of them) only through the adapter's stages and
:mod:`osscar_opt.formulations.surgery`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osscar_opt.adapters.base import ModelAdapter, Stage, StageCall, first_output
from osscar_opt.allocate import interpolate
from osscar_opt.evaluate import call_macs, count_parameters, time_call
from osscar_opt.formulations.structures import rows_for
from osscar_opt.formulations.surgery import apply_solution

METRICS = ("macs", "params", "latency")
LATENCY_POINTS = 9
LATENCY_REPEATS = 7


def cache_dir() -> Path:
    """Where latency tables are cached: ``$OSSCAR_CACHE`` or ``~/.cache/osscar_opt``."""
    return Path(os.environ.get("OSSCAR_CACHE") or Path.home() / ".cache" / "osscar_opt")


def _module_device(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def module_cost(module: nn.Module, call: Callable[[], Any], metric: str) -> float:
    """The cost of ``call()`` (a forward pass of ``module``): MACs, parameters of ``module`` or the
    median latency in milliseconds (:data:`LATENCY_REPEATS` runs after 2 warm-up runs)."""
    check_metric(metric)
    if metric == "params":
        return float(count_parameters(module))
    if metric == "macs":
        return float(call_macs(call))
    cuda = _module_device(module).type == "cuda"
    with torch.no_grad():
        return time_call(call, cuda=cuda, repeats=LATENCY_REPEATS, warmup=2)[0]


def model_cost(model: nn.Module, batch: torch.Tensor, metric: str) -> float:
    """The whole model's cost on ``batch`` (its calibration input: token ids or images)."""
    return module_cost(model, lambda: model(batch), metric)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {list(METRICS)}, got {metric!r}")
    return metric


def cut_copy(stage: Stage, position: int | dict[int, int], keep: int | None = None) -> nn.Module:
    """A deep copy of ``stage.module`` whose structure at ``position`` keeps its first ``keep``
    groups; ``position`` may instead map several positions to their keeps."""
    cuts = dict(position) if isinstance(position, dict) else {position: keep}
    module = copy.deepcopy(stage.module)
    for index, count in cuts.items():
        structure = stage.structures(module)[index]
        if count < structure.num_groups:
            W = structure.weight()
            columns = rows_for(structure.groups, range(count)).to(W.device)
            weights = torch.zeros_like(W)
            weights[:, columns] = W[:, columns]
            apply_solution(structure, range(count), weights, None)
    return module


class StageCoster:
    """Measures cost tables of one stage's structures on one batch (``hidden``, ``call``)."""

    def __init__(self, adapter: ModelAdapter, stage: Stage, hidden: torch.Tensor, call: StageCall,
                 metric: str, *, cache: bool = True) -> None:
        self.adapter = adapter
        self.stage = stage
        self.hidden = hidden
        self.call = call
        self.metric = check_metric(metric)
        self.cache = cache
        self._measured: dict[tuple[tuple[int, int], ...], float] = {}

    def _measure(self, cuts: dict[int, int]) -> float:
        """Cost of the stage with the structures at the positions of ``cuts`` cut to their keeps
        (``{}``: the stage as it is); each cut is measured once per coster."""
        key = tuple(sorted(cuts.items()))
        if key not in self._measured:
            module = cut_copy(self.stage, cuts) if cuts else self.stage.module
            run = lambda: first_output(module(self.hidden, *self.call.args, **self.call.kwargs))  # noqa: E731
            self._measured[key] = module_cost(module, run, self.metric)
        return self._measured[key]

    def table(self, position: int, keeps: Sequence[int]) -> list[float]:
        """``cost(k) - cost(full)`` of the structure at ``position`` for every ``k`` in ``keeps``."""
        structure = self.stage.structures(self.stage.module)[position]
        n = structure.num_groups
        if self.metric in ("macs", "params"):
            full = self._measure({})
            one = self._measure({position: 1}) if n > 1 else full
            per_group = (full - one) / (n - 1) if n > 1 else 0.0
            return [-(n - k) * per_group for k in keeps]
        points = sorted({max(1, round(n * j / (LATENCY_POINTS - 1))) for j in range(LATENCY_POINTS)} | {n})
        measured = self._latency_points(position, points)
        full = measured[-1]
        # Non-decreasing in k (timing noise must not make a wider layer look cheaper).
        for index in range(len(measured) - 2, -1, -1):
            measured[index] = min(measured[index], measured[index + 1])
        return [float(interpolate(points, measured, k)) - full for k in keeps]

    def interaction(self, first: int, second: int) -> float:
        """``delta`` of the bilinear term when two structures of this stage share a layer (a
        ResNet bottleneck's middle conv costs ``in_channels * out_channels``): the exact MACs or
        parameters with both cut are the two tables' sum plus ``delta * (k1 - n1) * (k2 - n2)``.
        Measured with both cut to one group; 0 for independent structures (transformers)."""
        if self.metric == "latency":
            return 0.0
        structures = self.stage.structures(self.stage.module)
        n1, n2 = structures[first].num_groups, structures[second].num_groups
        if n1 < 2 or n2 < 2:
            return 0.0
        full = self._measure({})
        both = self._measure({first: 1, second: 1})
        alone = self._measure({first: 1}) + self._measure({second: 1}) - full
        return (both - alone) / ((n1 - 1) * (n2 - 1))

    def _latency_points(self, position: int, points: list[int]) -> list[float]:
        key = self._cache_key(position, points)
        path = cache_dir() / "latency.json"
        stored = _read_cache(path) if self.cache else {}
        if key in stored:
            return list(stored[key])
        measured = [self._measure({position: k}) for k in points]
        if self.cache:
            _write_cache(path, key, measured)
        return measured

    def _cache_key(self, position: int, points: list[int]) -> str:
        module = self.stage.module
        parameter = next(module.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        signature = {
            "module": type(module).__name__,
            "shapes": [list(p.shape) for p in module.parameters()],
            "position": position, "points": points,
            "batch": list(self.hidden.shape), "dtype": str(self.hidden.dtype) if parameter is None
            else str(parameter.dtype),
            "device": f"{device.type}:{device_name}", "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(path: Path) -> dict[str, Any]:
    """The cached tables, or {} when there is no cache or it is unreadable (never fatal)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _write_cache(path: Path, key: str, measured: list[float]) -> None:
    """Add one table to the cache atomically (write a temporary file, then rename); a cache that
    cannot be written is skipped, not fatal."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        document = _read_cache(path)
        document[key] = measured
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(document))
        os.replace(temporary, path)
    except OSError:
        pass
