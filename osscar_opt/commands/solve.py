"""``osscar solve DIR``: re-solve saved layer problems in batch and print the per-layer table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from osscar_opt.commands.options import add_backend_arguments, parse_backend_options, problem_files, saved_budgets


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
              keep: int | None) -> list[dict[str, Any]]:
    """One row per problem: name, kind, groups, keep, loss, relative loss, status, seconds."""
    from osscar_opt.problem import LayerProblem
    from osscar_opt.solving import solve

    rows = []
    for path in files:
        problem = LayerProblem.load(path)
        budget = saved_budgets(problem, None if keep is None else [keep], sparsity)[0]
        solution = solve(problem, budget, backend, **options)
        rows.append({
            "file": path.name, "name": problem.meta.get("name", path.stem), "kind": problem.meta.get("kind", ""),
            "groups": problem.num_groups, "keep": solution.keep, "loss": solution.loss,
            "relative_loss": solution.loss / problem.c0 if problem.c0 > 0 else 0.0,
            "status": solution.status, "gap": solution.gap, "seconds": solution.seconds,
        })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = ("layer", "kind", "groups", "keep", "loss", "rel. loss", "status", "seconds")
    table = [header] + [
        (r["name"], r["kind"], str(r["groups"]), str(r["keep"]), f"{r['loss']:.6g}", f"{r['relative_loss']:.4f}",
         r["status"], f"{r['seconds']:.2f}") for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(r["seconds"] for r in rows)
    lines.append(f"{len(rows)} problems, total loss {sum(r['loss'] for r in rows):.6g}, {total:.2f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rows = solve_all(problem_files([args.directory]), args.backend, parse_backend_options(args.backend_option),
                     args.sparsity, args.keep)
    print(json.dumps(rows, indent=1) if args.json else format_rows(rows))
    return 0
