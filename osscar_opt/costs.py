"""Cost model: what a structure costs at each keep count, in MACs, parameters or milliseconds.

Costs are measured on the actual modules, not derived from per-family formulas: a deep copy of the
stage is cut to ``k`` groups (surgery with the first ``k`` groups; the weights' values do not
matter) and then

* ``macs``: torch's FLOP counter over one stage call on the cost batch, divided by two (the
  same counter :func:`osscar_opt.evaluate.count_macs` reports, so targets and reports agree). Linear
  in ``k`` for every structure here (projections, attention within a head, conv channels), so it
  is measured at the full width and at ``k = 1`` and interpolated: exact, checked by a test;
* ``params``: the parameters of the cut stage (exact, linear in ``k`` the same way);
* ``latency``: milliseconds of the stage call, from a :class:`LatencyTable` (below).

A structure's cost table holds ``cost(k) - cost(full)`` (zero or negative): how much the model's
cost changes when only this structure is cut to ``k``. The model's predicted cost is the dense
cost plus the sum over structures (exact for MACs and parameters; the latency model assumes the
savings add up, and the pipeline measures the pruned model against the dense one afterwards).

**Latency tables that can be trusted on a busy machine.** Wall time on a shared machine drifts
and spikes, and a table measured once at a bad moment steers the allocation wrong (a block that
"saves" the same at every width, a cut that "saves" nothing). So:

* the cut copies of every width and the full stage are timed *interleaved*, round after round
  (:func:`osscar_opt.evaluate.time_interleaved`), and each width's saving is the median over rounds
  of its time minus the full stage's time *in the same round* (paired: a slow moment of the
  machine falls on both);
* the spread of each saving is a robust standard deviation of those paired differences
  (``1.4826 * MAD``, the median absolute deviation: a spike in a third of the rounds does not
  move it), and the uncertainty of its median ``1.96 * 1.2533 * spread / sqrt(rounds)`` (a 95%
  interval of the median); while the widths' median uncertainty is above :data:`NOISE_SHARE` of
  the largest saving, more rounds are timed (up to :data:`MAX_LATENCY_ROUNDS`), and if the table
  still cannot tell the widths apart the target is refused with :class:`LatencyTooNoisy`, saying
  why;
* the savings are fitted non-decreasing in ``k`` by isotonic regression (a wider stage never
  looks cheaper), then interpolated between the measured widths;
* tables are cached on disk (JSON under ``$OSSCAR_CACHE`` or ``~/.cache/osscar_opt``) per stage
  shape, position, widths, batch, dtype, device, torch threads and version and a machine
  fingerprint, with their spread and rounds; a cached table is re-validated before use by
  re-timing its smallest width against the full stage, and measured again when that disagrees
  beyond its uncertainty. ``latency_cache="refresh"`` measures every table again.

Touches modules (copies of them) only through the adapter's stages and
:mod:`osscar_opt.formulations.surgery`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osscar_opt.adapters.base import ModelAdapter, Stage, StageCall
from osscar_opt.allocate import interpolate
from osscar_opt.budget import check_cache_mode
from osscar_opt.evaluate import call_macs, count_parameters, time_interleaved, wall_ms
from osscar_opt.formulations.structures import rows_for
from osscar_opt.formulations.surgery import apply_solution

METRICS = ("macs", "params", "latency")
LATENCY_POINTS = 9
LATENCY_ROUNDS = 7
"""Rounds a latency table is first timed with (each round times every width once)."""
MAX_LATENCY_ROUNDS = 56
NOISE_SHARE = 0.25
"""A table is precise enough when its widths' median uncertainty is at most this share of the largest saving."""
MEDIAN_INTERVAL = 1.96 * 1.2533
"""The 95% interval of a median of ``n`` values is ``1.96 * 1.2533 * sd / sqrt(n)`` wide on each side."""
MAD_TO_SD = 1.4826
DENSE_ROUNDS = 21
"""Runs the whole model is timed in for the dense latency a speed-up target divides."""
REVALIDATION_ROUNDS = 5
CACHE_VERSION = 2

LatencyTimer = Callable[[nn.Module, Callable[[], Any]], float]
"""Times one forward call of a module: ``timer(module, call) -> milliseconds``."""


def wall_timer(module: nn.Module, call: Callable[[], Any]) -> float:
    """The default :data:`LatencyTimer`: the call's wall time (the GPU synchronized around it)."""
    return wall_ms(call, cuda=_module_device(module).type == "cuda")


class LatencyTooNoisy(RuntimeError):
    """Timings vary more than the latency differences a table has to measure."""


def cache_dir() -> Path:
    """Where latency tables are cached: ``$OSSCAR_CACHE`` or ``~/.cache/osscar_opt``."""
    return Path(os.environ.get("OSSCAR_CACHE") or Path.home() / ".cache" / "osscar_opt")


def _module_device(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def module_cost(module: nn.Module, call: Callable[[], Any], metric: str, timer: LatencyTimer | None = None) -> float:
    """The cost of ``call()`` (a forward pass of ``module``): MACs, parameters of ``module`` or the
    median latency in milliseconds over :data:`DENSE_ROUNDS` runs after a warm-up."""
    check_metric(metric)
    if metric == "params":
        return float(count_parameters(module))
    if metric == "macs":
        return float(call_macs(call))
    timer = timer or wall_timer
    with torch.no_grad():
        times = time_interleaved([call], rounds=DENSE_ROUNDS, measure=lambda run: timer(module, run))
    return statistics.median(row[0] for row in times)


def model_cost(model: nn.Module, batch: torch.Tensor, metric: str, timer: LatencyTimer | None = None) -> float:
    """The whole model's cost on ``batch`` (its calibration input: token ids or images)."""
    return module_cost(model, lambda: model(batch), metric, timer)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {list(METRICS)}, got {metric!r}")
    return metric


def cut_copy(stage: Stage, position: int | dict[int, int], keep: int | None = None) -> nn.Module:
    """A deep copy of ``stage.module`` whose structure at ``position`` keeps its first ``keep``
    groups (of every block, as a budget counts them; 0 empties its sublayer where it can be);
    ``position`` may instead map several positions (in the uncut stage) to their keeps."""
    cuts = dict(position) if isinstance(position, dict) else {position: keep}
    names = [structure.name for structure in stage.structures(stage.module)]
    module = copy.deepcopy(stage.module)
    for index, count in cuts.items():
        structure = next((s for s in stage.structures(module) if s.name == names[index]), None)
        if structure is not None and count < structure.budget_groups:
            W = structure.weight()
            kept = structure.first_groups(count)
            columns = rows_for(structure.groups, kept).to(W.device)
            weights = torch.zeros_like(W)
            weights[:, columns] = W[:, columns]
            apply_solution(structure, kept, weights, None)
    return module


@dataclass
class LatencyTable:
    """A structure's measured latency savings.

    Attributes:
        points: the widths (kept groups) timed, ascending, the full width last.
        savings: ``time(k) - time(full)`` at each point, ms (<= 0), isotonic (non-decreasing in ``k``).
        spread: robust standard deviation (``1.4826 * MAD``) of each point's paired differences, ms.
        uncertainty: half-width of each saving's 95% interval, ms.
        full_ms: median time of the full stage, ms.
        rounds: the fewest rounds any width's saving rests on (rounds timed, less those with a spike).
    """

    points: list[int]
    savings: list[float]
    spread: list[float]
    uncertainty: list[float]
    full_ms: float
    rounds: int

    @property
    def precise(self) -> bool:
        """The widths' typical (median) uncertainty is within :data:`NOISE_SHARE` of the largest saving."""
        largest = -min(self.savings) if self.savings else 0.0
        return largest > 0 and statistics.median(self.uncertainty) <= NOISE_SHARE * largest

    @property
    def enough_rounds(self) -> bool:
        return self.rounds >= LATENCY_ROUNDS

    @classmethod
    def from_times(cls, points: list[int], times: list[list[float]]) -> LatencyTable:
        """The table from ``times[r][i]`` (round ``r``, width ``points[i]``; the full width last).

        Spiked calls (:func:`spiked`) are left out of the pairs; ``rounds`` counts the pairs left
        at the worst width."""
        spikes = spiked(times)
        savings, spread, uncertainty, pairs = [], [], [], []
        for index in range(len(points)):
            differences = [row[index] - row[-1] for row, bad in zip(times, spikes, strict=True)
                           if not (bad[index] or bad[-1])] or [row[index] - row[-1] for row in times]
            median = statistics.median(differences)
            savings.append(median)
            spread.append(MAD_TO_SD * statistics.median(abs(value - median) for value in differences))
            uncertainty.append(MEDIAN_INTERVAL * spread[-1] / math.sqrt(len(differences)))
            pairs.append(len(differences))
        floor = 1e-3 * max((abs(value) for value in savings), default=1.0) or 1e-9
        weights = [1.0 / max(value, floor) ** 2 for value in uncertainty]
        fitted = [min(0.0, value) for value in isotonic_increasing(savings, weights)]
        fitted[-1] = 0.0
        full = statistics.median(row[-1] for row in times)
        return cls(points, fitted, spread, uncertainty, full, min(pairs))

    def costs(self, keeps: Sequence[int]) -> list[float]:
        """``cost(k) - cost(full)`` at every ``k`` of ``keeps`` (interpolated between the points)."""
        return [float(interpolate(self.points, self.savings, k)) for k in keeps]


def isotonic_increasing(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """The weighted least-squares non-decreasing fit of ``values`` (pool adjacent violators)."""
    weights = [1.0] * len(values) if weights is None else list(weights)
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values, weights, strict=True):
        blocks.append([float(value), float(weight), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, weight_sum, count = blocks.pop()
            previous = blocks[-1]
            total = previous[1] + weight_sum
            blocks[-1] = [(previous[0] * previous[1] + mean * weight_sum) / total, total, previous[2] + count]
    return [mean for mean, _, count in blocks for _ in range(count)]


SPIKE_SHARE = 0.1
"""A call at least this much slower than its round's level (and than the noise explains) is a spike."""


def spiked(times: list[list[float]]) -> list[list[bool]]:
    """``bad[r][i]``: call ``i`` of round ``r`` was hit by a spike of the machine.

    Each call's time is divided by its width's median over rounds and by its round's level (the
    median of those ratios in the round: a slow round slows every width alike, which pairing
    already cancels); a call more than ``max(SPIKE_SHARE, 5 robust deviations)`` above 1 is a spike."""
    if len(times) < 3:
        return [[False] * len(row) for row in times]
    columns = list(zip(*times, strict=True))
    medians = [statistics.median(column) or 1e-12 for column in columns]
    relative = []
    for row in times:
        ratios = [value / median for value, median in zip(row, medians, strict=True)]
        level = statistics.median(ratios) or 1e-12
        relative.append([ratio / level - 1.0 for ratio in ratios])
    flat = [value for row in relative for value in row]
    center = statistics.median(flat)
    deviation = MAD_TO_SD * statistics.median(abs(value - center) for value in flat)
    limit = max(SPIKE_SHARE, 5 * deviation)
    return [[value - center > limit for value in row] for row in relative]


class StageCoster:
    """Measures cost tables of one stage's structures on one batch (``hidden``, ``call``).

    ``cache``: ``"use"`` (cached latency tables, re-validated), ``"refresh"`` (measure every table
    again and cache it) or ``"off"``; True / False stand for ``"use"`` / ``"off"``. ``timer`` times
    one stage call (:data:`LatencyTimer`; default: wall time). ``tables``: latency tables already
    measured or re-validated in this run, by cache key, shared between the costers of one prune so
    that identical blocks are timed once."""

    def __init__(self, adapter: ModelAdapter, stage: Stage, hidden: torch.Tensor, call: StageCall,
                 metric: str, *, cache: bool | str = "use", timer: LatencyTimer | None = None,
                 tables: dict[str, LatencyTable] | None = None) -> None:
        self.adapter = adapter
        self.stage = stage
        self.hidden = hidden
        self.call = call
        self.metric = check_metric(metric)
        self.cache = check_cache_mode(cache)
        self.timer = timer or wall_timer
        self._measured: dict[tuple[tuple[int, int], ...], float] = {}
        self.tables = {} if tables is None else tables

    def _module(self, cuts: dict[int, int]) -> nn.Module:
        return cut_copy(self.stage, cuts) if cuts else self.stage.module

    def _run(self, module: nn.Module) -> Callable[[], Any]:
        return lambda: self.adapter.run_stage(self.stage, self.hidden, self.call, module)

    def _measure(self, cuts: dict[int, int]) -> float:
        """MACs or parameters of the stage with the structures at the positions of ``cuts`` cut to
        their keeps (``{}``: the stage as it is); each cut is measured once per coster."""
        key = tuple(sorted(cuts.items()))
        if key not in self._measured:
            module = self._module(cuts)
            self._measured[key] = module_cost(module, self._run(module), self.metric)
        return self._measured[key]

    def table(self, position: int, keeps: Sequence[int]) -> list[float]:
        """``cost(k) - cost(full)`` of the structure at ``position`` for every ``k`` in ``keeps``."""
        structure = self.stage.structures(self.stage.module)[position]
        n = structure.budget_groups
        if self.metric in ("macs", "params"):
            full = self._measure({})
            one = self._measure({position: 1}) if n > 1 else full
            per_group = (full - one) / (n - 1) if n > 1 else 0.0
            return [-(n - k) * per_group for k in keeps]
        lowest = 0 if min(keeps) == 0 else 1  # an emptied sublayer is timed as such
        points = sorted({max(lowest, round(n * j / (LATENCY_POINTS - 1))) for j in range(LATENCY_POINTS)} | {n})
        return self.latency_table(position, points).costs(keeps)

    def interaction(self, first: int, second: int) -> float:
        """``delta`` of the bilinear term when two structures of this stage share a layer (a
        ResNet bottleneck's middle conv costs ``in_channels * out_channels``): the exact MACs or
        parameters with both cut are the two tables' sum plus ``delta * (k1 - n1) * (k2 - n2)``.
        Measured with both cut to one group; 0 for independent structures (transformers)."""
        if self.metric == "latency":
            return 0.0
        structures = self.stage.structures(self.stage.module)
        n1, n2 = structures[first].budget_groups, structures[second].budget_groups
        if n1 < 2 or n2 < 2:
            return 0.0
        full = self._measure({})
        both = self._measure({first: 1, second: 1})
        alone = self._measure({first: 1}) + self._measure({second: 1}) - full
        return (both - alone) / ((n1 - 1) * (n2 - 1))

    def _timed_calls(self, position: int, points: list[int]) -> list[Callable[[], float]]:
        """One call per width of ``points`` (the stage cut to it; the full stage for the full width),
        each returning its milliseconds by the timer."""
        n = points[-1]
        modules = [self._module({position: k} if k < n else {}) for k in points]
        return [self._timed(module) for module in modules]

    def _timed(self, module: nn.Module) -> Callable[[], float]:
        run = self._run(module)
        return lambda: self.timer(module, run)

    @staticmethod
    def _time(calls: list[Callable[[], float]], rounds: int) -> list[list[float]]:
        with torch.no_grad():
            return time_interleaved(calls, rounds=rounds, measure=lambda call: call())

    def latency_table(self, position: int, points: list[int]) -> LatencyTable:
        """The structure's latency table at ``points``: from the cache when it re-validates, else
        measured until precise (:class:`LatencyTable`), else :class:`LatencyTooNoisy`."""
        key = self._cache_key(position, points)
        if key in self.tables:
            return self.tables[key]
        path = cache_dir() / "latency.json"
        if self.cache == "use":
            cached = _cached_table(_read_cache(path).get(key), points)
            if cached is not None and self._still_valid(position, cached):
                self.tables[key] = cached
                return cached
        calls = self._timed_calls(position, points)
        times = self._time(calls, LATENCY_ROUNDS)
        table = LatencyTable.from_times(points, times)
        while not (table.precise and table.enough_rounds) and len(times) < MAX_LATENCY_ROUNDS:
            times += self._time(calls, min(len(times), MAX_LATENCY_ROUNDS - len(times)))
            table = LatencyTable.from_times(points, times)
        if not table.precise:
            raise LatencyTooNoisy(self._noisy_message(position, table, len(times)))
        if self.cache != "off":
            _write_cache(path, key, {"version": CACHE_VERSION, **asdict(table)})
        self.tables[key] = table
        return table

    def _still_valid(self, position: int, table: LatencyTable) -> bool:
        """Re-time the smallest width against the full stage: the cached saving must fall within
        the new measurement's interval widened by the table's own uncertainty."""
        points = [table.points[0], table.points[-1]]
        check = LatencyTable.from_times(points, self._time(self._timed_calls(position, points), REVALIDATION_ROUNDS))
        tolerance = max(check.uncertainty[0] + table.uncertainty[0], NOISE_SHARE * abs(table.savings[0]))
        return abs(check.savings[0] - table.savings[0]) <= tolerance

    def _noisy_message(self, position: int, table: LatencyTable, timed: int) -> str:
        structure = self.stage.structures(self.stage.module)[position]
        largest = -min(table.savings)
        spiked = f" ({timed - table.rounds} hit by spikes and left out)" if timed > table.rounds else ""
        return (
            f"latency of {structure.name}: after {timed} interleaved rounds{spiked} its savings are still uncertain "
            f"by +-{statistics.median(table.uncertainty):.3f} ms (robust standard deviation "
            f"{statistics.median(table.spread):.3f} ms), "
            f"while cutting it from {table.points[-1]} to {table.points[0]} groups saves {largest:.3f} ms of "
            f"{table.full_ms:.3f} ms: this machine is too busy (or the stage too small) to tell the widths apart. "
            "Use a target in MACs or parameters (exact), or run the speed-up target on an idle machine"
        )

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
            "torch": torch.__version__, "machine": machine_fingerprint(),
        }
        return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:32]


def machine_fingerprint() -> str:
    """The processor model, core count and system: a table measured on another machine is not reused."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}|{os.cpu_count()}|{platform.system()}|{platform.machine()}"


def _cached_table(entry: Any, points: list[int]) -> LatencyTable | None:
    """A cached table written by this version, or None (older or damaged entries are measured again)."""
    if not isinstance(entry, dict) or entry.get("version") != CACHE_VERSION:
        return None
    try:
        table = LatencyTable(**{name: entry[name] for name in LatencyTable.__dataclass_fields__})
    except (KeyError, TypeError):
        return None
    lengths = {len(table.savings), len(table.spread), len(table.uncertainty)}
    return table if table.points == points and lengths == {len(points)} else None


def _read_cache(path: Path) -> dict[str, Any]:
    """The cached tables, or {} when there is no cache or it is unreadable (never fatal)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _write_cache(path: Path, key: str, measured: dict[str, Any]) -> None:
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
