"""``osscar certify FILES... --keep K [K ...]``: heuristic vs exact / certified bound, one row per layer and keep.

For every saved :class:`~osscar_opt.problem.LayerProblem` and every budget: the heuristic
(``--heuristic``, default local-search) loss, the certified relaxation bound (``--shift``), and
for every ``--backend`` (default gurobi and cvxpy, outer approximation) the exact loss, its bound,
status and seconds. A backend that fails on a layer (e.g. the Gurobi size limit) gets its error
in the row instead of stopping the run. ``--json OUT`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from osscar_opt.commands.options import parse_backend_options, problem_files, saved_budgets


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "certify", help="certified optimality gaps of a heuristic on saved layer problems",
        description="For each saved problem file and budget, compare the heuristic with exact backends and a "
        "certified lower bound.",
    )
    parser.add_argument("files", nargs="+", help="LayerProblem files (*.safetensors) or folders of them")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, nargs="+", default=None,
                        help="groups kept (one or more; default: the budget saved with each problem)")
    budget.add_argument("--sparsity", type=float, default=None,
                        help="fraction of groups removed in every problem (the pipeline's budget rule)")
    parser.add_argument("--heuristic", default="local-search", help="heuristic backend (default local-search)")
    parser.add_argument("--backend", action="append", default=None, metavar="NAME[:FORMULATION]",
                        help="exact backend, repeatable (default: gurobi and cvxpy, outer-approximation); "
                        "'none' for bounds only")
    parser.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option for the exact backends, repeatable (e.g. time_limit=60)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per exact solve (default 60)")
    parser.add_argument("--shift", default="scalar", choices=("scalar", "block", "both"),
                        help="shift of the certified relaxation bound (default scalar)")
    parser.add_argument("--iterations", type=int, default=200, help="relaxation iterations (default 200)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the rows as JSON to OUT")
    parser.set_defaults(func=run)


def _backends(items: list[str] | None) -> list[tuple[str, str]]:
    if items is None:
        return [("gurobi", "outer-approximation"), ("cvxpy", "outer-approximation")]
    if items == ["none"]:
        return []
    result = []
    for item in items:
        name, _, formulation = item.partition(":")
        result.append((name, formulation or "outer-approximation"))
    return result


def certify_rows(files: list[Path], keeps: list[int] | None, heuristic: str, exact: list[tuple[str, str]],
                 options: dict[str, Any], shift: str, iterations: int,
                 sparsity: float | None = None) -> list[dict[str, Any]]:
    """One row per (file, keep): the heuristic, the certified bound, and each exact backend's result."""
    from osscar_opt.certify import certify
    from osscar_opt.problem import LayerProblem
    from osscar_opt.solving import solve

    rows = []
    for path in files:
        problem = LayerProblem.load(path)
        for keep in saved_budgets(problem, keeps, sparsity):
            found = solve(problem, keep, heuristic)
            certificate = certify(problem, found, shift=shift, iterations=iterations)
            row: dict[str, Any] = {
                "file": path.name, "name": problem.meta.get("name", path.stem), "groups": problem.num_groups,
                "keep": keep, "heuristic": heuristic, "heuristic_loss": found.loss,
                "heuristic_seconds": found.seconds, "bound": certificate.lower_bound, "bounds": certificate.bounds,
                "certified_gap": certificate.gap, "certify_seconds": certificate.seconds, "exact": {},
            }
            best_bound = certificate.lower_bound
            for name, formulation in exact:
                label = f"{name}:{formulation}"
                begin = time.perf_counter()
                try:
                    solution = solve(problem, keep, name, formulation=formulation,
                                     warm_start=list(found.support), **options)
                except ValueError as exc:
                    row["exact"][label] = {"status": "error", "error": str(exc),
                                           "seconds": time.perf_counter() - begin}
                    continue
                row["exact"][label] = {"loss": solution.loss, "lower_bound": solution.lower_bound,
                                       "gap": solution.gap, "status": solution.status, "seconds": solution.seconds}
                if solution.lower_bound is not None:
                    best_bound = max(best_bound, min(solution.lower_bound, found.loss))
            row["best_bound"] = best_bound
            row["heuristic_gap"] = 0.0 if found.loss <= 0 else max(0.0, (found.loss - best_bound) / found.loss)
            rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The table: one line per layer and keep, one column group per exact backend."""
    labels = sorted({label for row in rows for label in row["exact"]})
    header = ["layer", "groups", "keep", "heuristic loss", "bound", "cert. gap", "s"]
    for label in labels:
        header += [f"{label} loss", "status", "gap", "s"]
    header.append("heuristic gap")
    table = [header]
    for row in rows:
        line = [row["name"], str(row["groups"]), str(row["keep"]), f"{row['heuristic_loss']:.6g}",
                f"{row['bound']:.6g}", f"{row['certified_gap']:.2%}", f"{row['certify_seconds']:.1f}"]
        for label in labels:
            entry = row["exact"].get(label)
            if entry is None:
                line += ["", "", "", ""]
            elif entry["status"] == "error":
                line += ["-", "error", "-", f"{entry['seconds']:.1f}"]
            else:
                gap = "-" if entry["gap"] is None else f"{entry['gap']:.2%}"
                line += [f"{entry['loss']:.6g}", entry["status"], gap, f"{entry['seconds']:.1f}"]
        line.append(f"{row['heuristic_gap']:.2%}")
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    text = "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
                     for line in table)
    errors = [f"{row['name']} keep {row['keep']} {label}: {entry['error']}" for row in rows
              for label, entry in row["exact"].items() if entry["status"] == "error"]
    return text + ("\n" + "\n".join(errors) if errors else "")


def run(args: argparse.Namespace) -> int:
    if args.iterations < 1:
        raise ValueError(f"iterations: expected a positive integer, got {args.iterations}")
    if args.time_limit <= 0:
        raise ValueError(f"time_limit: expected a positive number, got {args.time_limit}")
    options = {"time_limit": args.time_limit}
    options.update(parse_backend_options(args.backend_option))
    rows = certify_rows(problem_files(args.files), args.keep, args.heuristic, _backends(args.backend), options,
                        args.shift, args.iterations, args.sparsity)
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0
