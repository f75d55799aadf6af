"""Batches: many (problem, backend, keep) solves, certificates or loss curves through one executor.

``solve_many(problems, keeps, backends, executor=...)`` returns one plain-data row per task in a
deterministic order (problem, then backend, then keep), whatever the executor
(:mod:`osscar_opt.executors`: ``serial``, ``processes``, ``ray``) and whatever order the tasks
finish in. Problems travel to workers as their safetensors bytes or file paths, never pickled
objects; rows come back as JSON-ready dicts.

With ``results=PATH`` every finished task is appended to ``PATH`` as one JSON line at once
(flushed and synced), after a header line naming the batch's problems by content hash. A rerun
with the same file skips the tasks it holds (rows with an error are run again), so a batch that
was stopped, killed or lost a machine goes on where it was; a file written for another problem
set is refused. Only this process writes the file, under an exclusive lock.

A task that fails for its own reasons (a solver error, a licence limit, an unreadable problem)
becomes a row with ``status: "error"`` and its message; the batch goes on. A worker that dies
is the executor's business (its task runs again, up to ``retries`` times).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from osscar_opt import problem_file
from osscar_opt.executors import make_executor
from osscar_opt.executors.base import DEFAULT_RETRIES, Executor
from osscar_opt.plain import plain
from osscar_opt.problem import LayerProblem
from osscar_opt.results_file import ResultsFile

TASK_KINDS = ("solve", "curve", "certify")
_CACHE_SIZE = 2  # problems a worker keeps loaded between its tasks (tasks come grouped by problem)
_cache: OrderedDict[str, LayerProblem] = OrderedDict()


# --------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class ProblemSource:
    """One problem of a batch, as the parent knows it before any solve.

    Attributes:
        id: a content id (:func:`content_id`): the same problem under another file name, or saved
            again, is the same problem.
        name, kind, groups, keep: from its metadata (``keep``: the saved budget, or None).
        path: the file it comes from, or None for an in-memory problem.
        problem: the in-memory problem (None for a file).
        error: why the file cannot be read (its tasks become error rows), or None.
    """

    id: str
    name: str
    kind: str
    groups: int | None
    keep: int | None
    path: Path | None = None
    problem: LayerProblem | None = None
    error: str | None = None

    @property
    def file(self) -> str:
        return self.path.name if self.path is not None else self.name


def content_id(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> str:
    """First 16 hex digits of a sha256 over the problem's tensors (by name: dtype, shape, bytes) and
    metadata, in sorted order (safetensors' own byte layout is not canonical: its header order varies)."""
    digest = hashlib.sha256(json.dumps(dict(metadata), sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def _problem_id(problem: LayerProblem) -> str:
    return content_id(*problem_file.encode(problem))


def _file_id(path: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return content_id({key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {})  # noqa: SIM118
    except Exception:  # noqa: BLE001 - not safetensors: its raw bytes identify it
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                digest.update(chunk)
        return digest.hexdigest()[:16]


def problem_sources(problems: Iterable[LayerProblem | str | os.PathLike]) -> list[ProblemSource]:
    """The batch's problems: :class:`LayerProblem` objects, problem files, or folders of ``*.safetensors``.

    A file that cannot be read is kept (its tasks become error rows); a path that does not exist,
    an empty folder, another kind of item, no problem at all, or the same problem twice is refused.
    """
    if isinstance(problems, LayerProblem | str | os.PathLike):
        problems = [problems]
    sources: list[ProblemSource] = []
    for item in problems:
        if isinstance(item, LayerProblem):
            name = str(item.meta.get("name", f"problem{len(sources)}"))
            sources.append(ProblemSource(_problem_id(item), name, str(item.meta.get("kind", "")),
                                         item.num_groups, item.keep, problem=item))
            continue
        if not isinstance(item, str | os.PathLike):
            raise ValueError(f"problems: expected LayerProblem objects or paths, got {type(item).__name__}")
        path = Path(item)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ValueError(f"problems: folder {path} holds no *.safetensors problem files")
        elif path.is_file():
            files = [path]
        else:
            raise ValueError(f"problems: no such file or folder: {path}")
        for file in files:
            try:
                head = LayerProblem.peek(file)
            except ValueError as exc:
                sources.append(ProblemSource(_file_id(file), file.stem, "", None, None, path=file,
                                             error=" ".join(str(exc).split())))
                continue
            sources.append(ProblemSource(_file_id(file), head["name"], head["kind"], head["groups"],
                                         head["keep"], path=file))
    if not sources:
        raise ValueError("problems: expected at least one problem")
    seen: dict[str, int] = {}
    for position, source in enumerate(sources):
        if source.id in seen:
            raise ValueError(f"problems: items {seen[source.id]} ({sources[seen[source.id]].file}) and {position} "
                             f"({source.file}) are the same problem")
        seen[source.id] = position
    return sources


# --------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One unit of work: ``kind`` ("solve", "curve" or "certify") on problem ``source`` (an index) with ``spec``.

    ``spec`` is JSON data: for "solve" ``{"backend", "keep", "options"}``, for "curve"
    ``{"keeps", "swaps"}``, for "certify" what :func:`osscar_opt.certify.certify_task` takes. Two
    tasks with the same problem, kind and spec are the same task.
    """

    kind: str
    source: int
    spec: dict[str, Any]

    def key(self, sources: Sequence[ProblemSource]) -> str:
        return json.dumps([sources[self.source].id, self.kind, self.spec], sort_keys=True)


def _load(source: LayerProblem | str | bytes, problem_id: str) -> LayerProblem:
    """The task's problem: the object itself, or read from a path or bytes (kept for the next task)."""
    if isinstance(source, LayerProblem):
        return source
    if problem_id in _cache:
        _cache.move_to_end(problem_id)
        return _cache[problem_id]
    problem = LayerProblem.load(source) if isinstance(source, str) else LayerProblem.from_bytes(source, problem_id)
    _cache[problem_id] = problem
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return problem


def _solve(problem: LayerProblem, spec: dict[str, Any]) -> dict[str, Any]:
    from osscar_opt import solving  # module attribute: a patched solving.solve is honoured

    solution = solving.solve(problem, spec["keep"], spec["backend"], **spec["options"])
    return {"support": list(solution.support), "loss": solution.loss,
            "relative_loss": solution.loss / problem.c0 if problem.c0 > 0 else 0.0,
            "lower_bound": solution.lower_bound, "gap": solution.gap, "status": solution.status,
            "seconds": solution.seconds, "info": plain(solution.info)}


def _curve(problem: LayerProblem, spec: dict[str, Any]) -> dict[str, Any]:
    from osscar_opt.curves import loss_curve

    begin = time.perf_counter()
    curve = loss_curve(problem, spec["keeps"], swaps=spec["swaps"])
    return {"keeps": curve.keeps, "relative": curve.relative, "supports": [list(s) for s in curve.supports],
            "heldout": curve.heldout, "status": "done", "seconds": time.perf_counter() - begin}


def _certify(problem: LayerProblem, spec: dict[str, Any]) -> dict[str, Any]:
    from osscar_opt.certify import certify_task

    return certify_task(problem, spec)


_RUNNERS: dict[str, Callable[[LayerProblem, dict[str, Any]], dict[str, Any]]] = {
    "solve": _solve, "curve": _curve, "certify": _certify}


def run_task(kind: str, source: LayerProblem | str | bytes, spec: dict[str, Any], problem_id: str,
             threads: int | None = None) -> dict[str, Any]:
    """Run one task in a worker (on ``threads`` torch threads when given); its own failure is a row
    ``{"status": "error", "error", "error_type"}``."""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        problem = _load(source, problem_id)
        return {**_RUNNERS[kind](problem, spec), "worker": worker}
    except Exception as exc:  # noqa: BLE001 - recorded in the row, the batch goes on
        return {"status": "error", "error": _error_text(exc), "error_type": type(exc).__name__, "worker": worker}
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def _error_text(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    if isinstance(exc, ValueError | OSError | ImportError) and message:
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def is_error(row: Mapping[str, Any]) -> bool:
    """Whether a batch row is the row of a task that failed."""
    return row.get("status") == "error"


# --------------------------------------------------------------------------- running
def _row_head(task: Task, source: ProblemSource, key: str) -> dict[str, Any]:
    head = {"key": key, "task": task.kind, "problem_id": source.id, "file": source.file, "name": source.name,
            "kind": source.kind, "groups": source.groups}
    if task.kind == "solve":
        head.update({"backend": task.spec["backend"], "keep": task.spec["keep"], "options": task.spec["options"]})
    elif task.kind == "certify":
        head.update({"keep": task.spec["keep"], "heuristic": task.spec["heuristic"]})
    return head


def run_tasks(
    sources: Sequence[ProblemSource],
    tasks: Sequence[Task],
    executor: str | Executor = "serial",
    *,
    workers: int | None = None,
    address: str | None = None,
    retries: int = DEFAULT_RETRIES,
    results: str | os.PathLike | None = None,
    progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Run ``tasks`` on ``sources`` and return their rows in task order (see :func:`solve_many`).

    ``on_row(row)`` is called in this process for every row as its task finishes (not for rows
    read back from ``results``). The executor is closed at the end unless an instance was given.
    """
    from tqdm.auto import tqdm

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: expected a positive integer, got {threads!r}")
    keys = [task.key(sources) for task in tasks]
    if len(set(keys)) != len(keys):
        raise ValueError("tasks: the same task is listed twice")
    owned = not isinstance(executor, Executor)
    runner = make_executor(executor, workers, retries, address) if owned else executor
    try:
        record = ResultsFile(results, [(s.id, s.name) for s in sources]) if results is not None else None
        done = record.open() if record is not None else {}
    except BaseException:
        if owned:
            runner.close()
        raise
    rows: list[dict[str, Any] | None] = [None] * len(tasks)
    todo = []
    for index, key in enumerate(keys):
        if key in done and not is_error(done[key]):
            rows[index] = done[key]
        else:
            todo.append(index)
    failures = 0
    bar = tqdm(total=len(todo), desc="tasks", unit="task", disable=not progress, dynamic_ncols=True)

    def finished(index: int, result: dict[str, Any]) -> None:
        nonlocal failures
        task, source = tasks[index], sources[tasks[index].source]
        row = {**_row_head(task, source, keys[index]), **result}
        rows[index] = row
        if record is not None:
            record.append(plain(row))
        failures += is_error(row)
        bar.update(1)
        if failures:
            bar.set_postfix(failed=failures)
        if on_row is not None:
            on_row(row)

    stack = contextlib.ExitStack()
    try:
        calls = []
        for index in todo:
            source = sources[tasks[index].source]
            if source.error is not None:  # unreadable file: no worker needed to say so
                finished(index, {"status": "error", "error": source.error, "error_type": "ValueError"})
                continue
            calls.append(index)
        if calls:
            # the largest problems first (a stable sort keeps each problem's tasks together): the
            # last tasks to finish are then short ones, and the workers end together
            calls.sort(key=lambda index: -(sources[tasks[index].source].groups or 0))
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="osscar-batch-"))
            handles: dict[int, Any] = {}  # one payload per problem, however many tasks use it
            payloads = []
            for index in calls:
                task, source = tasks[index], sources[tasks[index].source]
                if task.source not in handles:
                    handles[task.source] = _payload(runner, source, Path(scratch))
                payloads.append((index, (task.kind, handles[task.source], task.spec, source.id, threads)))
            runner.run(run_task, payloads, finished)
    finally:
        stack.close()
        bar.close()
        if record is not None:
            record.close()
        if owned:
            runner.close()
    return [row for row in rows if row is not None]


def _payload(runner: Executor, source: ProblemSource, scratch: Path) -> LayerProblem | str | Any:
    """What a worker gets for ``source``: the object in this process; a path for local worker
    processes (an in-memory problem is saved once into ``scratch``, a temporary folder, so that
    each task sends a path, not megabytes); the bytes, put once into the executor's object store,
    elsewhere."""
    if runner.name == "serial":
        return source.problem if source.problem is not None else str(source.path)
    if runner.name == "processes":
        if source.path is not None:
            return str(source.path)
        path = scratch / f"{source.id}.safetensors"
        source.problem.save(path)
        return str(path)
    data = source.problem.to_bytes() if source.problem is not None else source.path.read_bytes()
    return runner.share(source.id, data)


# --------------------------------------------------------------------------- public entry points
def _as_list(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, Sequence):
        return list(value)
    raise ValueError(f"{name}: expected one value or a list, got {type(value).__name__}")


def _backend_options(backends: list[str], options: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Options per backend: ``{backend: {...}}`` when every key names a listed backend, else the
    same options for every backend. Each backend must exist, be installed and accept its options."""
    from osscar_opt import backends as registry
    from osscar_opt.backends.base import check_options, declared_options

    options = dict(options or {})
    per_backend = bool(options) and all(key in backends for key in options)
    result = {}
    for name in backends:
        if not isinstance(name, str):
            raise ValueError(f"backends: expected backend names, got {name!r}")
        backend = registry.get(name)
        if not backend.is_installed():
            raise ValueError(f"backends: {backend.missing_message()}")
        chosen = dict(options.get(name) or {}) if per_backend else dict(options)
        accepted = declared_options(backend)
        if accepted is not None:
            check_options(name, chosen, accepted)
        json.dumps(chosen)  # options travel as JSON data
        result[name] = chosen
    return result


def _keeps_of(source: ProblemSource, keeps: list[int], sparsity: float | None) -> list[int]:
    from osscar_opt.budget import keep_count

    if keeps:
        return keeps
    if source.groups is None:
        return [None]  # unreadable: one error row
    if sparsity is not None:
        return [keep_count(source.groups, sparsity)]
    if source.keep is None:
        raise ValueError(f"keep: problem {source.name} has no saved budget; pass keeps (--keep) or sparsity "
                         "(--sparsity)")
    return [source.keep]


def solve_many(
    problems: Iterable[LayerProblem | str | os.PathLike] | LayerProblem | str | os.PathLike,
    keeps: int | Sequence[int] | None = None,
    backends: str | Sequence[str] = "local-search",
    *,
    options: Mapping[str, Any] | None = None,
    sparsity: float | None = None,
    executor: str | Executor = "serial",
    workers: int | None = None,
    address: str | None = None,
    retries: int = DEFAULT_RETRIES,
    results: str | os.PathLike | None = None,
    progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Solve every problem with every backend at every keep; one row per task, in the order
    problem, backend, keep (the same for every executor).

    Args:
        problems: :class:`LayerProblem` objects, problem files, or folders of them.
        keeps: groups kept (one or several); None: ``sparsity``'s keep, else each problem's saved budget.
        backends: backend names. ``options``: the same options for every backend, or
            ``{backend: options}``.
        executor: "serial", "processes", "ray", or an :class:`~osscar_opt.executors.Executor`.
        workers: tasks at once; ``address``: the Ray cluster (``executor="ray"``);
            ``retries``: re-runs of a task whose worker died.
        results: JSON-lines file; finished tasks are appended as they come and skipped on a rerun.
        progress: a progress bar on stderr. ``on_row``: called with each new row.
        threads: torch threads per task (default: this process's for ``serial``, the cores over the
            workers for ``processes``, one for ``ray``). Deterministic backends give the same rows
            bit for bit on every executor when the tasks run on the same number of threads
            (BLAS sums in another order on another thread count).

    Returns:
        Rows (plain dicts): ``key, task, problem_id, file, name, kind, groups, backend, keep,
        options`` and either ``support, loss, relative_loss, lower_bound, gap, status, seconds,
        info, worker`` or ``status: "error", error, error_type``.

    Everything is checked before any task runs: backends (installed, options accepted), keeps
    (integers in ``[0, groups]``), executor and workers.
    """
    from osscar_opt.budget import check_sparsity
    from osscar_opt.solving import check_keep

    sources = problem_sources(problems)
    names = _as_list(backends, "backends")
    if not names:
        raise ValueError("backends: expected at least one backend name")
    if len(set(names)) != len(names):
        raise ValueError(f"backends: {names} names a backend twice")
    per_backend = _backend_options(names, options)
    budgets = _as_list(keeps, "keeps")
    if sparsity is not None:
        if budgets:
            raise ValueError("keeps: give keeps or sparsity, not both")
        check_sparsity(sparsity, "sparsity")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"keeps: {budgets} lists a keep twice")
    tasks = []
    for position, source in enumerate(sources):
        for name in names:
            for keep in _keeps_of(source, budgets, sparsity):
                if source.groups is not None:
                    if source.problem is not None:
                        keep = check_keep(source.problem, keep)
                    elif isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= source.groups:
                        raise ValueError(f"keeps: {keep!r} is not an integer in [0, {source.groups}] (the groups of "
                                         f"{source.file})")
                tasks.append(Task("solve", position, {"backend": name, "keep": keep, "options": per_backend[name]}))
    return run_tasks(sources, tasks, executor, workers=workers, address=address, retries=retries, results=results,
                     progress=progress, on_row=on_row, threads=threads)


def curves_many(
    problems: Sequence[LayerProblem],
    keeps: Sequence[Sequence[int]],
    swaps: Sequence[int],
    *,
    executor: str | Executor = "serial",
    workers: int | None = None,
    address: str | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """The loss curve (:func:`osscar_opt.curves.loss_curve`) of each problem at its ``keeps``, with
    its ``swaps``, through an executor; rows with ``keeps``, ``relative``, ``supports``, in order.
    A curve that fails raises RuntimeError naming its problem (a curve is needed, not optional)."""
    if not (len(problems) == len(keeps) == len(swaps)):
        raise ValueError("keeps, swaps: expected one entry per problem")
    sources = problem_sources(problems)
    tasks = [Task("curve", position, {"keeps": sorted(int(k) for k in grid), "swaps": int(count)})
             for position, (grid, count) in enumerate(zip(keeps, swaps, strict=True))]
    rows = run_tasks(sources, tasks, executor, workers=workers, address=address, threads=threads)
    for row in rows:
        if is_error(row):
            raise RuntimeError(f"loss curve of {row['name']} failed: {row['error']}")
    return rows


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per backend and keep: tasks, failures, mean relative loss, total and mean seconds."""
    groups: dict[tuple[str, Any], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row.get("backend", row.get("task", "")), row.get("keep")), []).append(row)
    header = ("backend", "keep", "tasks", "failed", "mean rel. loss", "seconds", "s/task")
    lines = [header]
    for (backend, keep), members in groups.items():
        good = [row for row in members if not is_error(row)]
        seconds = sum(float(row.get("seconds", 0.0)) for row in good)
        mean = sum(float(row["relative_loss"]) for row in good) / len(good) if good and "relative_loss" in good[0] \
            else float("nan")
        lines.append((str(backend), "-" if keep is None else str(keep), str(len(members)),
                      str(len(members) - len(good)), "-" if math.isnan(mean) else f"{mean:.4f}", f"{seconds:.2f}",
                      f"{seconds / len(good):.3f}" if good else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths,
                                                                                                    strict=True)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)

