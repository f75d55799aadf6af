"""``osscar solve DIR``: solve saved layer problems in batch, with one or more backends and keeps,
on this process, local worker processes or Ray (:mod:`osscar_opt.batch`), and print the table."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from osscar_opt.budget import check_sparsity
from osscar_opt.commands.options import (
    PartialFailure,
    add_executor_arguments,
    check_backend,
    executor_from,
    is_error_row,
    parse_backend_options,
    problem_files,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "solve", help="re-solve saved layer problems (from prune --save-problems) with any backends, in parallel",
        description="Solve every *.safetensors LayerProblem in DIR with every --backend at every --keep. The budget "
        "is the 'keep' stored with each problem unless --sparsity or --keep is given. --workers / --ray spread the "
        "tasks over processes or a Ray cluster; --results makes the batch resumable.",
    )
    parser.add_argument("directory", help="folder of saved problems (or a single problem file)")
    parser.add_argument("--backend", nargs="+", default=["local-search"], metavar="NAME",
                        help="backend names (default: local-search)")
    parser.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option for every backend, repeatable (values parsed as JSON when possible)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--sparsity", type=float, default=None, help="fraction of groups removed in every problem")
    budget.add_argument("--keep", type=int, nargs="+", default=None, help="groups kept in every problem (one or more)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_executor_arguments(parser)
    parser.set_defaults(func=run)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The table (a failed task shows "-" and status error; a backend column when there are
    several), its errors, and a total line."""
    several = len({row.get("backend") for row in rows}) > 1
    header = ("layer", "kind", *(("backend",) if several else ()), "groups", "keep", "loss", "rel. loss", "status",
              "seconds")

    def cells(r: dict[str, Any]) -> tuple[str, ...]:
        backend = (str(r.get("backend", "")),) if several else ()
        if is_error_row(r):
            return (r["name"], r["kind"], *backend, "-" if r["groups"] is None else str(r["groups"]),
                    "-" if r["keep"] is None else str(r["keep"]), "-", "-", "error", "-")
        return (r["name"], r["kind"], *backend, str(r["groups"]), str(r["keep"]), f"{r['loss']:.6g}",
                f"{r['relative_loss']:.4f}", r["status"], f"{r['seconds']:.2f}")

    left = 3 if several else 2
    table = [header] + [cells(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = [r for r in rows if is_error_row(r)]
    lines += [f"error {r['file']}" + (f" ({r['backend']} keep {r['keep']})" if several else "") + f": {r['error']}"
              for r in failed]
    lines += total_lines(rows)
    return "\n".join(lines)


def total_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The total line; with several backends, or a problem solved at several keeps, one total per
    backend and keep (losses of different backends or budgets of one problem are never added; the
    layers of one run, each at its own keep, are)."""
    sweep = _solved_at_several_keeps(rows)
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for row in rows:  # a failed row without a keep (an unreadable file) counts in the overall line only
        if not (is_error_row(row) and row.get("keep") is None):
            groups.setdefault((str(row.get("backend", "")), row.get("keep") if sweep else None), []).append(row)
    if len(groups) <= 1:
        return [_total(rows, "problems")]
    several_keeps = len({keep for _, keep in groups}) > 1
    failed = sum(1 for row in rows if is_error_row(row))
    lines = [f"{len(rows)} tasks" + (f" ({failed} failed)" if failed else "") + "; totals per backend and keep:"]
    for (backend, keep), members in groups.items():
        where = backend + (f", keep {keep}" if several_keeps and keep is not None else "")
        lines.append(f"  {where}: {_total(members, 'problems')}")
    return lines


def _solved_at_several_keeps(rows: list[dict[str, Any]]) -> bool:
    keeps: dict[tuple[str, Any], set[Any]] = {}
    for row in rows:
        keeps.setdefault((str(row.get("backend", "")), row.get("name")), set()).add(row.get("keep"))
    return any(len(k) > 1 for k in keeps.values())


def _total(rows: list[dict[str, Any]], noun: str) -> str:
    solved = [row for row in rows if not is_error_row(row)]
    failed = len(rows) - len(solved)
    return (f"{len(rows)} {noun}" + (f" ({failed} failed)" if failed else "") +
            f", total loss{' of the solved' if failed else ''} {sum(r['loss'] for r in solved):.6g}, "
            f"{sum(r['seconds'] for r in solved):.2f} s")


def run(args: argparse.Namespace) -> int:
    from osscar_opt.batch import solve_many, summary_table

    options = parse_backend_options(args.backend_option)
    for name in args.backend:  # an unknown backend or option fails before any problem is read
        check_backend(name, options)
    if len(set(args.backend)) != len(args.backend):
        raise ValueError(f"--backend: {args.backend} names a backend twice")
    if args.sparsity is not None:
        check_sparsity(args.sparsity, "sparsity")
    for keep in args.keep or []:
        if keep < 0:
            raise ValueError(f"keep: expected a number of groups >= 0, got {keep}")
    files = problem_files([args.directory])
    executor = executor_from(args)
    done: list[dict[str, Any]] = []
    per_task = len(args.backend) * len(args.keep or [None])
    noun = "problems" if per_task == 1 else "tasks"

    def show(rows: list[dict[str, Any]]) -> None:
        print(json.dumps(rows, indent=1) if args.json else format_rows(rows), flush=True)

    try:
        rows = solve_many(files, args.keep, args.backend, options=options, sparsity=args.sparsity,
                          executor=executor, results=args.results, progress=sys.stderr.isatty(), on_row=done.append,
                          threads=args.threads)
    except BaseException:  # stopped (Ctrl-C, no budget): the rows done so far are not lost
        if done:
            show(done)
        saved = f"; they are in {args.results} and a rerun with --results {args.results} goes on from there" \
            if args.results and done else "; nothing was saved"
        args.interrupt_note = (f"{len(done)} of {len(files) * per_task} {noun} were done (printed above){saved}"
                               if done else "nothing was saved")
        raise
    finally:
        executor.close()
    show(rows)
    if not args.json and (per_task > 1 or executor.name != "serial"):
        print(f"\n{executor.describe()}; {len(done)} run now, {len(rows) - len(done)} read from {args.results}"
              if args.results else f"\n{executor.describe()}")
        print(summary_table(rows))
    failed = [row for row in rows if is_error_row(row)]
    if failed:
        names = ", ".join(dict.fromkeys(row["file"] for row in failed))
        raise PartialFailure(f"{len(failed)} of {len(rows)} {noun} failed: {names}")
    return 0
