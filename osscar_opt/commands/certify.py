"""``osscar certify FILES... --keep K [K ...]``: heuristic vs exact / certified bound, one row per layer and keep.

For every saved :class:`~osscar_opt.problem.LayerProblem` and every budget: the heuristic
(``--heuristic``, default local-search) loss, the certified relaxation bound (``--shift``: the
SDP-optimal ``diagonal`` shift by default, ``block``, ``scalar`` or ``both``), and for every
``--backend`` (default scip and gurobi, outer approximation; ``bnb`` for the branch and bound) the
exact loss, its bound, status and seconds. ``--time-limit`` is a wall-clock limit on each exact backend call. A backend
that fails on a layer (e.g. the Gurobi size limit) gets its error in the row instead of stopping
the run.

The table (at most 100 columns) has one line per layer and keep: losses relative to ``c0`` (the
loss of pruning every group: the layer's dense output energy plus the ridge term), the best
certified bound over the relaxation and every exact backend, the heuristic's gap to it, the best
exact status and the method whose bound is best. A keep at or above a layer's number of groups
is skipped with a line saying so; keeps below 2% of a layer's groups get a note line before
solving. ``--json OUT`` writes every row with every backend's details; ``--plot PNG`` draws the
certified gap against keep, one line per layer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from osscar_opt.budget import keep_count
from osscar_opt.commands.options import (
    PartialFailure,
    add_executor_arguments,
    check_backend,
    check_output_path,
    executor_from,
    is_error_row,
    parse_backend_options,
    problem_files,
)
from osscar_opt.solving import relative_gap

WIDTH = 100  # the table and the lines under it fit this many columns
TINY_SHARE = 0.02  # a keep below this share of a layer's groups gets a note
# Best first: the status shown for a row with several exact backends.
STATUS_ORDER = ("optimal", "time_limit", "iteration_limit", "node_limit", "work_limit", "solution_limit",
                "interrupted", "suboptimal", "inaccurate", "numeric")
UNIT = "loss / c0"
UNIT_TEXT = "losses in units of c0, the loss of pruning every group (dense output energy + ridge)"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "certify", help="certified optimality gaps of a heuristic on saved layer problems",
        description="For each saved problem file and budget, compare the heuristic with exact backends and a "
        "certified lower bound.",
    )
    parser.add_argument("files", nargs="+", help="LayerProblem files (*.safetensors) or folders of them")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, nargs="+", default=None,
                        help="groups kept (one or more; default: the budget saved with each problem); a keep at "
                        "or above a layer's number of groups is skipped")
    budget.add_argument("--sparsity", type=float, default=None,
                        help="fraction of groups removed in every problem (the pipeline's budget rule)")
    parser.add_argument("--heuristic", default="local-search", help="heuristic backend (default local-search)")
    parser.add_argument("--backend", action="append", default=None, metavar="NAME[:FORMULATION]",
                        help="exact backend, repeatable (default: scip and gurobi, outer-approximation); "
                        "'none' for bounds only")
    parser.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option for the exact backends, repeatable (e.g. time_limit=60)")
    parser.add_argument("--time-limit", type=float, default=60.0,
                        help="wall-clock seconds per exact backend call, setup included, and for each relaxation "
                        "bound (default 60)")
    parser.add_argument("--shift", default="diagonal", choices=("scalar", "diagonal", "block", "both"),
                        help="shift of the certified relaxation bound: the diagonal (default) or block-diagonal D "
                        "that maximizes it, the scalar lambda_min(H), or both scalar and block")
    parser.add_argument("--iterations", type=int, default=200, help="relaxation iterations (default 200)")
    parser.add_argument("--json", default=None, metavar="OUT",
                        help="write the rows, with every backend's details, as JSON to OUT")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="draw the certified gap (%%) against keep, one line per layer, to PNG (needs matplotlib)")
    add_executor_arguments(parser)
    parser.set_defaults(func=run)


def _backends(items: list[str] | None) -> list[tuple[str, str]]:
    if items is None:  # scip: the open one-tree branch-and-cut; gurobi where installed
        return [("scip", "outer-approximation"), ("gurobi", "outer-approximation")]
    if items == ["none"]:
        return []
    result = []
    for item in items:
        name, _, formulation = item.partition(":")
        result.append((name, formulation or ("branch-and-bound" if name == "bnb" else "outer-approximation")))
    return result


def _short_method(label: str) -> str:
    """``gurobi:outer-approximation`` -> ``gurobi:oa`` (the table's method column)."""
    name, _, formulation = label.partition(":")
    if formulation == "branch-and-bound":
        return name
    return f"{name}:oa" if formulation == "outer-approximation" else label


def _relative(value: float | None, c0: float) -> float | None:
    if value is None:
        return None
    return value / c0 if c0 > 0 else 0.0


def usable_budgets(name: str, groups: int, budgets: list[int],
                   log: Callable[[str], None]) -> tuple[list[int], list[str]]:
    """The budgets that suit a layer of ``groups`` groups, and its notes.

    Keeps at or above ``groups`` (nothing to choose) or below 1 are skipped with a line; keeps
    below ``TINY_SHARE`` of the groups get one note line for the layer, and one note each
    (returned, to be recorded in the rows). Lines fit ``WIDTH`` columns.
    """
    def say(line: str) -> None:
        log(textwrap.fill(line, WIDTH, subsequent_indent="    ", break_on_hyphens=False))

    unique = list(dict.fromkeys(budgets))
    too_many = [str(keep) for keep in unique if keep >= groups]
    if too_many:
        say(f"skip {name}: keep {', '.join(too_many)} >= its {groups} groups (nothing to choose)")
    too_few = [str(keep) for keep in unique if keep < 1]
    if too_few:
        say(f"skip {name}: keep {', '.join(too_few)} keeps no group")
    usable = [keep for keep in unique if 1 <= keep < groups]
    tiny = [keep for keep in usable if keep < TINY_SHARE * groups]
    notes = [f"keep {keep} of {groups} groups ({keep / groups:.1%})" for keep in tiny]
    if tiny:
        say(f"note {name}: keep {', '.join(str(k) for k in tiny)} of {groups} groups "
            f"({', '.join(f'{k / groups:.1%}' for k in tiny)}): a tiny share of this layer")
    return usable, notes


def _best(row: dict[str, Any]) -> tuple[str, str]:
    """``(status, method)`` of a row: the best exact status ("bound" with no exact backend, "error"
    when every one failed) and the method whose bound is the best one."""
    entries, bounds = row["exact"], row["bounds"]
    method = "relax:block" if bounds.get("block", -math.inf) > bounds.get("scalar", -math.inf) else "relax"
    best = row["bound"]
    statuses = []
    for label, entry in entries.items():
        if entry["status"] == "error":
            continue
        statuses.append(entry["status"])
        bound = entry.get("lower_bound")
        if bound is not None and (min(bound, row["heuristic_loss"]) > best
                                  or (entry["status"] == "optimal" and min(bound, row["heuristic_loss"]) >= best)):
            best, method = min(bound, row["heuristic_loss"]), label
    if not entries:
        return "bound", method
    if not statuses:
        return "error", method
    ranked = sorted(statuses, key=lambda s: STATUS_ORDER.index(s) if s in STATUS_ORDER else len(STATUS_ORDER))
    return ranked[0], method


def certify_rows(files: list[Path], keeps: list[int] | None, heuristic: str, exact: list[tuple[str, str]],
                 options: dict[str, Any], shift: str, iterations: int,
                 sparsity: float | None = None, log: Callable[[str], None] | None = None,
                 keep_going: bool = True, rows: list[dict[str, Any]] | None = None,
                 executor: Any = "serial", results: str | None = None, progress: bool = False,
                 threads: int | None = None) -> list[dict[str, Any]]:
    """One row per (file, keep): the heuristic, the certified bound, and each exact backend's result.

    Every row keeps the raw losses (``heuristic_loss``, ``bound``, ``best_bound``, each backend's
    ``loss`` / ``lower_bound``) and adds them relative to ``c0`` (``*_relative``, unit ``loss / c0``).
    ``log`` receives the skip and note lines (printed before solving by the command).

    The (file, keep) pairs are tasks of one batch (:mod:`osscar_opt.batch`) on ``executor``, with
    ``results`` as its resumable record. An exact backend that fails gets its error in the row; a
    file that cannot be read, or a (file, keep) whose heuristic or bound fails, gets a row
    ``{file, name, keep, status: "error", error}`` (``keep_going=False``: the first such row raises
    instead). ``rows``: a list to append the rows to as they come (in completion order).
    """
    from osscar_opt.batch import Task, problem_sources, run_tasks

    log = log or (lambda line: None)
    sources = problem_sources(files)
    tasks, notes_of = [], {}
    for position, source in enumerate(sources):
        if source.error is not None:
            tasks.append(Task("certify", position, {"keep": None, "heuristic": heuristic}))
            continue
        budgets = keeps
        if budgets is None and sparsity is None and source.keep is None:
            raise ValueError(f"keep: problem {source.name} has no saved budget; pass --keep or --sparsity")
        if not budgets:
            budgets = [keep_count(source.groups, sparsity)] if sparsity is not None else [source.keep]
        usable, notes = usable_budgets(source.name, source.groups, list(budgets), log)
        for keep in usable:
            notes_of[(source.id, keep)] = [note for note in notes if note.startswith(f"keep {keep} of ")]
            tasks.append(Task("certify", position, {
                "keep": keep, "heuristic": heuristic, "exact": [list(pair) for pair in exact], "options": options,
                "shift": shift, "iterations": iterations}))
    collected = [] if rows is None else rows

    def completed(row: dict[str, Any]) -> dict[str, Any]:
        if is_error_row(row):
            return {key: row[key] for key in ("file", "name", "groups", "heuristic", "keep", "status", "error")}
        return _complete(row, notes_of.get((row["problem_id"], row["keep"]), []))

    def finished(row: dict[str, Any]) -> None:
        if is_error_row(row) and not keep_going:
            raise RuntimeError(f"{row['file']} keep {row['keep']}: {row['error']}")
        collected.append(completed(row))

    return [completed(row) for row in run_tasks(sources, tasks, executor, results=results, progress=progress,
                                                on_row=finished, threads=threads)]


def _complete(row: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """A certify task's row with the relative values, the best bound, loss, status and method."""
    c0 = row["c0"]
    row = {**row, "unit": UNIT, "heuristic_loss_relative": _relative(row["heuristic_loss"], c0),
           "bound_relative": _relative(row["bound"], c0), "notes": notes}
    best_bound, best_loss = row["bound"], row["heuristic_loss"]
    for entry in row["exact"].values():
        if entry["status"] == "error":
            continue
        entry["loss_relative"] = _relative(entry["loss"], c0)
        entry["lower_bound_relative"] = _relative(entry["lower_bound"], c0)
        best_loss = min(best_loss, entry["loss"])
        if entry["lower_bound"] is not None:
            best_bound = max(best_bound, min(entry["lower_bound"], row["heuristic_loss"]))
    row["best_bound"] = best_bound
    row["best_bound_relative"] = _relative(best_bound, c0)
    row["heuristic_gap"] = relative_gap(row["heuristic_loss"], best_bound)
    row["best_loss"] = best_loss
    row["best_loss_relative"] = _relative(best_loss, c0)
    row["best_status"], row["best_method"] = _best(row)
    return row


def _ellipsize(text: str, width: int) -> str:
    """``text`` cut from the left to ``width`` characters, marked with "..."."""
    return text if len(text) <= width else "..." + text[len(text) - width + 3:]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_rows(rows: list[dict[str, Any]], width: int = WIDTH) -> str:
    """The table: a header, one line per layer and keep (at most ``width`` columns), then notes."""
    header = ["layer", "groups", "keep", "heur. loss", "bound", "gap %", "status", "method", "s"]
    body = []
    for row in rows:
        c0 = row.get("c0", 0.0)
        status, method = row.get("best_status"), row.get("best_method")
        if status is None:
            status, method = _best(row)
        body.append([
            row["name"], str(row["groups"]), str(row["keep"]),
            _number(row.get("heuristic_loss_relative", _relative(row["heuristic_loss"], c0))),
            _number(row.get("best_bound_relative", _relative(row["best_bound"], c0))),
            f"{100 * row['heuristic_gap']:.2f}", status, _short_method(method),
            f"{row.get('seconds', row['certify_seconds']):.1f}",
        ])
    widths = [max([len(header[i])] + [len(line[i]) for line in body]) for i in range(len(header))]
    others = sum(widths[1:]) + 2 * (len(header) - 1)
    widths[0] = max(12, min(widths[0], width - others))
    for line in body:
        line[0] = _ellipsize(line[0], widths[0])

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True)])

    heuristics = sorted({row["heuristic"] for row in rows}) or ["-"]
    intro = (f"{UNIT_TEXT}; heuristic: {', '.join(heuristics)}; bound: best certified lower bound, from "
             "method; gap % = (heuristic loss - bound) / heuristic loss; status: best exact backend's; "
             "s: seconds per row")
    lines = textwrap.wrap(intro, width)
    lines += [render(header), render(["-" * w for w in widths])]
    lines += [render(line) for line in body]
    notes = []
    for row in rows:
        layer = f"{row['name']} keep {row['keep']}"
        for label, entry in row["exact"].items():
            if entry["status"] == "error":
                notes.append(f"{layer} {label}: {entry['error']}")
            elif entry.get("note") and entry["status"] != "time_limit":  # a time limit explains CVXPY's
                notes.append(f"{layer} {label} ({entry['status']}): solver said: {entry['note']}")
        if row.get("best_loss", row["heuristic_loss"]) < row["heuristic_loss"] * (1 - 1e-9):
            notes.append(f"{layer}: an exact backend found loss {_number(row.get('best_loss_relative'))} "
                         f"< the heuristic's {_number(row.get('heuristic_loss_relative'))} ({UNIT})")
    for note in notes:
        lines += textwrap.wrap(note, width, subsequent_indent="    ")
    return "\n".join(lines)



def _report(rows: list[dict[str, Any]], json_path: str | None) -> None:
    """The table of the rows that were computed, one line per failed row, and the --json file (every row)."""
    print(format_rows([row for row in rows if not is_error_row(row)]))
    for row in rows:
        if is_error_row(row):
            where = row["file"] if row["keep"] is None else f"{row['file']} keep {row['keep']}"
            print(textwrap.fill(f"error {where}: {row['error']}", WIDTH, subsequent_indent="    "))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=2), encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    if args.iterations < 1:
        raise ValueError(f"iterations: expected a positive integer, got {args.iterations}")
    if args.time_limit <= 0:
        raise ValueError(f"time_limit: expected a positive number, got {args.time_limit}")
    check_output_path(args.json, "--json")
    check_output_path(args.plot, "--plot")
    if args.plot:
        from osscar_opt.plots import _pyplot

        try:
            _pyplot()  # before the solves: a missing matplotlib should not cost a long run
        except ImportError as exc:
            raise ValueError(f"plot: {exc}") from exc
    given = parse_backend_options(args.backend_option)
    exact = _backends(args.backend)
    check_backend(args.heuristic, flag="--heuristic")
    for name, formulation in exact:  # the defaults (gurobi, cvxpy) may be missing: those rows say so
        try:
            check_backend(name, given, installed=args.backend is not None, formulation=formulation)
        except ValueError as exc:
            if args.backend is None and str(exc).startswith("options:"):
                raise ValueError(f"{exc} (--backend-option goes to every exact backend: the defaults are scip "
                                 "and gurobi; name the ones you want with --backend)") from None
            raise
    options = {"time_limit": args.time_limit}
    options.update(given)
    files = problem_files(args.files)
    executor = executor_from(args)
    done: list[dict[str, Any]] = []
    try:
        rows = certify_rows(files, args.keep, args.heuristic, exact, options, args.shift, args.iterations,
                            args.sparsity, log=lambda line: print(line, flush=True),
                            keep_going=not getattr(args, "debug", False), rows=done, executor=executor,
                            results=args.results, progress=sys.stderr.isatty(), threads=args.threads)
    except BaseException:  # stopped (Ctrl-C, no budget): the rows done so far are printed and written
        if done:
            _report(done, args.json)
            args.interrupt_note = f"the {len(done)} rows done are printed above" + (
                f" and written to {args.json}" if args.json else "") + (
                f"; a rerun with --results {args.results} goes on from there" if args.results else "")
        raise
    finally:
        executor.close()
    _report(rows, args.json)
    good = [row for row in rows if not is_error_row(row)]
    if args.plot:
        from osscar_opt.plots import gap_plot

        if good:
            print(f"plot: {gap_plot(good, args.plot)}")
        else:
            print("plot: no rows, nothing drawn")
    failed = sorted({row["file"] for row in rows if is_error_row(row)})
    if failed:
        raise PartialFailure(f"{len(rows) - len(good)} of {len(rows)} rows failed ({', '.join(failed)}); "
                             "see the error lines above")
    return 0
