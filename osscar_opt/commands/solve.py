"""``osscar solve DIR``: re-solve saved layer problems in batch and print the per-layer table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from osscar_opt.budget import check_sparsity
from osscar_opt.commands.options import (
    PartialFailure,
    add_backend_arguments,
    check_backend,
    error_row,
    is_error_row,
    parse_backend_options,
    problem_files,
    saved_budgets,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "solve", help="re-solve saved layer problems (from prune --save-problems) with any backend",
        description="Solve every *.safetensors LayerProblem in DIR. The budget is the 'keep' stored with each "
        "problem unless --sparsity or --keep is given.",
    )
    parser.add_argument("directory", help="folder of saved problems (or a single problem file)")
    add_backend_arguments(parser)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--sparsity", type=float, default=None, help="fraction of groups removed in every problem")
    budget.add_argument("--keep", type=int, default=None, help="number of groups kept in every problem")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.set_defaults(func=run)


def solve_all(files: list[Path], backend: str, options: dict[str, Any], sparsity: float | None,
              keep: int | None, keep_going: bool = False,
              rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per problem: name, kind, groups, keep, loss, relative loss, status, seconds.

    ``keep_going``: a problem that cannot be read or solved gets a row with ``status: "error"``
    and its message, and the batch goes on (else the error stops it). A problem with no saved
    budget and no ``keep`` / ``sparsity`` always stops it (the command line must give one).
    ``rows``: a list to append the rows to as they come (kept when the batch is stopped).
    """
    from osscar_opt.problem import LayerProblem
    from osscar_opt.solving import solve

    rows = [] if rows is None else rows
    for path in files:
        try:
            problem = LayerProblem.load(path)
        except Exception as exc:
            if not keep_going:
                raise
            rows.append(error_row(path, path.stem, keep, exc, kind="", groups=None))
            continue
        name, kind = problem.meta.get("name", path.stem), problem.meta.get("kind", "")
        budget = saved_budgets(problem, None if keep is None else [keep], sparsity)[0]
        try:
            solution = solve(problem, budget, backend, **options)
        except Exception as exc:
            if not keep_going:
                raise
            rows.append(error_row(path, name, budget, exc, kind=kind, groups=problem.num_groups))
            continue
        rows.append({
            "file": path.name, "name": name, "kind": kind,
            "groups": problem.num_groups, "keep": solution.keep, "loss": solution.loss,
            "relative_loss": solution.loss / problem.c0 if problem.c0 > 0 else 0.0,
            "status": solution.status, "gap": solution.gap, "seconds": solution.seconds,
        })
    return rows



def format_rows(rows: list[dict[str, Any]]) -> str:
    """The table (a failed problem shows "-" and status error), its errors, and a total line."""
    header = ("layer", "kind", "groups", "keep", "loss", "rel. loss", "status", "seconds")

    def cells(r: dict[str, Any]) -> tuple[str, ...]:
        if is_error_row(r):
            return (r["name"], r["kind"], "-" if r["groups"] is None else str(r["groups"]),
                    "-" if r["keep"] is None else str(r["keep"]), "-", "-", "error", "-")
        return (r["name"], r["kind"], str(r["groups"]), str(r["keep"]), f"{r['loss']:.6g}",
                f"{r['relative_loss']:.4f}", r["status"], f"{r['seconds']:.2f}")

    table = [header] + [cells(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    solved = [r for r in rows if not is_error_row(r)]
    failed = [r for r in rows if is_error_row(r)]
    lines += [f"error {r['file']}: {r['error']}" for r in failed]
    total = sum(r["seconds"] for r in solved)
    summary = f"{len(rows)} problems, total loss {sum(r['loss'] for r in solved):.6g}, {total:.2f} s"
    if failed:
        summary = f"{len(rows)} problems ({len(failed)} failed), total loss of the {len(solved)} solved " \
                  f"{sum(r['loss'] for r in solved):.6g}, {total:.2f} s"
    lines.append(summary)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    options = parse_backend_options(args.backend_option)
    check_backend(args.backend, options)  # an unknown backend or option fails before any problem is read
    if args.sparsity is not None:
        check_sparsity(args.sparsity, "sparsity")
    if args.keep is not None and args.keep < 0:
        raise ValueError(f"keep: expected a number of groups >= 0, got {args.keep}")
    files = problem_files([args.directory])
    rows: list[dict[str, Any]] = []

    def show() -> None:
        print(json.dumps(rows, indent=1) if args.json else format_rows(rows), flush=True)

    try:
        solve_all(files, args.backend, options, args.sparsity, args.keep, keep_going=not getattr(args, "debug", False),
                  rows=rows)
    except BaseException:  # stopped (Ctrl-C, no budget): the rows done so far are not lost
        if rows:
            show()
        args.interrupt_note = (f"{len(rows)} of {len(files)} problems were done (printed above); nothing was saved"
                               if rows else "nothing was saved")
        raise
    show()
    failed = [row["file"] for row in rows if is_error_row(row)]
    if failed:
        raise PartialFailure(f"{len(failed)} of {len(rows)} problems failed: {', '.join(failed)}")
    return 0
