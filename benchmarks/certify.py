"""Certification benchmark: time to prove optimality, bounds of each relaxation, branch and bound on real layers.

1. Structured random head-like problems (12 groups of 4 columns, 3 outputs: small enough for the
   MIQP form under the pip Gurobi licence): every backend x formulation, several budgets.
2. Real attention-output layers of all-MiniLM-L6-v2 (12 heads of 32 columns, activations on
   stdlib docstrings): time to prove optimality at every keep, outer approximation on scip (one
   branch-and-cut tree), gurobi (lazy cuts) and cvxpy/SCIP (one MILP master per cut), and gurobi's
   MIQP form (384 x 384 continuous variables: beyond the pip licence, and recorded as such),
   against enumeration; then a table of scip against gurobi per keep: the goal is every keep
   proved optimal by scip within 60 s and within 2x gurobi's time.
3. Relaxation bounds on real layers: the certified gap of the same solution with the scalar shift
   ``lambda_min(H) I``, the optimized diagonal shift and the optimized block-diagonal shift
   (:func:`osscar_opt.relaxation.block_shift`), and the share of the scalar gap each closes, on the
   MiniLM head layers (against the enumerated optimum), the MiniLM FFN layers (1536 neurons, keep
   768, against local search; goal: certified gap <= 20%) and the conv layers of a digits-trained
   ResNet18 (against the ``bnb`` optimum where it is proved within the time limit, else local search).
4. ``bnb`` (branch and bound) on 32-, 48- and 64-group problems cut from real layers
   (``LayerProblem.subproblem``: random blocks of MiniLM FFN neurons and SmolLM2 MLP neurons, keep
   half): status, time to prove, nodes, root and final gap; ``scip`` on the 32-group ones as the
   peer. Goal: 48-group problems proved within 10 minutes each.

Every exact backend gets the same warm start (the local-search support). Torch runs on
``--threads`` threads (default 1: each cut is a small dense factorization, and more threads only
oversubscribe a shared machine). Prints the tables and writes JSON to
benchmarks/results/certify.json (``--out``); a section skipped keeps its rows from the file.

    python benchmarks/certify.py [--heads-blocks 3] [--ffn-blocks 0 3] [--time-limit 60]
        [--heads-backends scip gurobi cvxpy] [--skip-random] [--skip-heads] [--skip-relaxations]
        [--skip-bnb] [--bnb-sizes 32 48 64] [--bnb-time-limit 600] [--threads 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minilm_layers import minilm_layer_problems  # noqa: E402

from osscar_opt import certify, solve  # noqa: E402
from tests.helpers import random_problem  # noqa: E402

COMBOS = [("scip", "outer-approximation"), ("gurobi", "outer-approximation"), ("gurobi", "miqp"),
          ("cvxpy", "outer-approximation"), ("cvxpy", "miqp")]
# Section 2 (real heads): outer approximation on each backend named by --heads-backends; gurobi's
# MIQP form is recorded too (refused at once: beyond the size-limited licence). cvxpy's MIQP form is
# not run: 384 x 384 continuous variables and a dense quadratic (tens of GB in CVXPY).
HEADS_BACKENDS = ["scip", "gurobi", "cvxpy", "bnb"]
GOAL_SECONDS, GOAL_RATIO = 60.0, 2.0
SCIP_PEER_SECONDS = 120.0  # time limit of scip on the 32-group problems of part 4


def _run(problem, keep, backend, formulation, time_limit, warm):
    begin = time.perf_counter()
    try:
        solution = solve(problem, keep, backend, formulation=formulation, time_limit=time_limit, warm_start=warm)
    except ValueError as exc:
        return {"status": "error: " + str(exc).split(";")[0][:60], "seconds": time.perf_counter() - begin}
    return {"status": solution.status, "loss": solution.loss, "gap": solution.gap, "seconds": solution.seconds}


def _cell(entry):
    if entry["status"].startswith("error"):
        return "size limit" if "10010" in entry["status"] else "error"
    return f"{entry['status'][:8]} {entry['seconds']:.1f}s gap {entry['gap']:.0e}"


def proofs(problems: dict[str, object], keeps_of, time_limit: float, combos) -> list[dict]:
    rows = []
    for name, problem in problems.items():
        for keep in keeps_of(problem):
            begin = time.perf_counter()
            optimum = solve(problem, keep, "enumerate")
            row = {"layer": name, "keep": keep, "optimum": optimum.loss, "enumerate_s": time.perf_counter() - begin}
            warm = list(solve(problem, keep, "local-search").support)
            row["local_search_optimal"] = abs(problem.loss(warm) - optimum.loss) <= 1e-9 * optimum.loss
            for backend, formulation in combos:
                entry = _run(problem, keep, backend, formulation, time_limit, warm)
                entry["matches_optimum"] = abs(entry.get("loss", float("inf")) - optimum.loss) <= 1e-9 * optimum.loss
                row[f"{backend}:{formulation}"] = entry
            rows.append(row)
            print(format_proof_row(row, combos), flush=True)
    return rows


def format_proof_row(row, combos) -> str:
    cells = [f"{row['layer']:>14}", f"{row['keep']:>4}", f"{row['enumerate_s']:>6.1f}s",
             "yes" if row["local_search_optimal"] else " no"]
    cells += [f"{_cell(row[f'{b}:{f}']):>28}" for b, f in combos]
    return " | ".join(cells)


def proof_header(combos) -> str:
    names = [f"{b}:{'oa' if f.startswith('outer') else f}" for b, f in combos]
    return " | ".join([f"{'layer':>14}", "keep", "enumer.", "LS=opt"] + [f"{n:>28}" for n in names])


def scip_against_gurobi(rows: list[dict]) -> list[dict]:
    """Per layer and keep: scip's and gurobi's time to prove optimality, and whether scip meets the
    goal (optimal, the enumerate optimum, at most GOAL_SECONDS and GOAL_RATIO x gurobi's time)."""
    table = []
    for row in rows:
        scip, gurobi = row.get("scip:outer-approximation"), row.get("gurobi:outer-approximation")
        cvxpy = row.get("cvxpy:outer-approximation")
        bnb = row.get("bnb:branch-and-bound")
        if scip is None:
            continue
        proved = scip["status"] == "optimal" and scip["matches_optimum"]
        entry = {"layer": row["layer"], "keep": row["keep"], "scip_status": scip["status"],
                 "scip_s": scip["seconds"], "scip_matches_optimum": scip["matches_optimum"],
                 "scip_within_60s": proved and scip["seconds"] <= GOAL_SECONDS}
        for name, other in (("gurobi", gurobi), ("cvxpy", cvxpy), ("bnb", bnb)):
            if other is not None:
                entry[f"{name}_status"], entry[f"{name}_s"] = other["status"], other["seconds"]
        if gurobi is not None and gurobi["status"] == "optimal":
            entry["ratio_to_gurobi"] = scip["seconds"] / gurobi["seconds"]
            entry["scip_within_2x_gurobi"] = proved and entry["ratio_to_gurobi"] <= GOAL_RATIO
        entry["goal_met"] = entry["scip_within_60s"] and entry.get("scip_within_2x_gurobi", True)
        table.append(entry)
    return table


def format_scip_table(table: list[dict]) -> str:
    lines = [" | ".join([f"{'layer':>14}", "keep", f"{'scip':>18}", f"{'gurobi':>18}", f"{'cvxpy':>18}",
                         f"{'bnb':>18}", "scip/gurobi", "<=60s", "<=2x", "goal"])]
    for entry in table:
        cells = [f"{entry['layer']:>14}", f"{entry['keep']:>4}"]
        for name in ("scip", "gurobi", "cvxpy", "bnb"):
            cells.append(f"{entry[f'{name}_status'][:10]:>10} {entry[f'{name}_s']:>6.2f}s" if f"{name}_s" in entry
                         else f"{'-':>18}")
        ratio = entry.get("ratio_to_gurobi")
        cells.append(f"{ratio:>11.2f}" if ratio is not None else f"{'-':>11}")
        within_2x = entry.get("scip_within_2x_gurobi")
        cells += [f"{'yes' if entry['scip_within_60s'] else 'no':>5}",
                  f"{'-' if within_2x is None else 'yes' if within_2x else 'no':>4}",
                  "yes" if entry["goal_met"] else "NO"]
        lines.append(" | ".join(cells))
    if table:
        total = {name: sum(entry.get(f"{name}_s", 0.0) for entry in table)
                 for name in ("scip", "gurobi", "cvxpy", "bnb")}
        met = sum(entry["goal_met"] for entry in table)
        lines.append(f"goal met on {met} of {len(table)} keeps; total seconds: scip {total['scip']:.1f}, gurobi "
                     f"{total['gurobi']:.1f}, cvxpy {total['cvxpy']:.1f}, bnb {total['bnb']:.1f}")
    return "\n".join(lines)


SHIFTS = ("scalar", "diagonal", "block")


def relaxation_gaps(cases: list[tuple[str, object, int, str]], iterations: int, shift_iterations: int,
                    time_limit: float) -> list[dict]:
    """Per (layer, problem, keep, reference): the reference loss and each shift's bound and certified gap.

    ``reference`` is "enumerate" (the optimum), "bnb" (the optimum when bnb proves it within
    ``time_limit``) or "local-search". The block shift is run only where groups have several columns
    (for single columns it is the diagonal one)."""
    rows = []
    for name, problem, keep, reference in cases:
        begin = time.perf_counter()
        local = solve(problem, keep, "local-search")
        row = {"layer": name, "groups": problem.num_groups, "columns": problem.num_columns, "keep": keep,
               "local_search_loss": local.loss, "reference": "local-search", "reference_loss": local.loss}
        if reference in ("enumerate", "bnb"):
            options = {"time_limit": time_limit} if reference == "bnb" else {}
            exact = solve(problem, keep, reference, **options)
            if exact.status == "optimal":
                row.update(reference=f"{reference} optimum", reference_loss=exact.loss, reference_s=exact.seconds)
        shifts = SHIFTS if max(problem.group_sizes) > 1 else SHIFTS[:2]
        for shift in shifts:
            tick = time.perf_counter()
            certificate = certify(problem, local, shift=shift, iterations=iterations, shift_iterations=shift_iterations)
            bound = certificate.bounds[shift]
            row[f"bound_{shift}"] = bound
            row[f"gap_{shift}"] = max(0.0, (row["reference_loss"] - bound) / row["reference_loss"])
            row[f"seconds_{shift}"] = time.perf_counter() - tick
        for shift in shifts[1:]:
            row[f"closed_{shift}"] = (1.0 - row[f"gap_{shift}"] / row["gap_scalar"]) if row["gap_scalar"] > 0 else 0.0
        row["seconds"] = time.perf_counter() - begin
        rows.append(row)
        print(format_relaxation_row(row), flush=True)
    return rows


def relaxation_header() -> str:
    return " | ".join([f"{'layer':>16}", "groups", "keep", f"{'reference':>17}", "gap scalar", "gap diag",
                       "gap block", "closed diag", "closed block", "s diag", "s block"])


def format_relaxation_row(row: dict) -> str:
    def percent(key):
        return f"{row[key]:.1%}" if key in row else "-"

    def seconds(key):
        return f"{row[key]:.1f}" if key in row else "-"

    return " | ".join([f"{row['layer']:>16}", f"{row['groups']:>6}", f"{row['keep']:>4}", f"{row['reference']:>17}",
                       f"{percent('gap_scalar'):>10}", f"{percent('gap_diagonal'):>8}", f"{percent('gap_block'):>9}",
                       f"{percent('closed_diagonal'):>11}", f"{percent('closed_block'):>12}",
                       f"{seconds('seconds_diagonal'):>6}", f"{seconds('seconds_block'):>7}"])


def block_problems(layers: dict[str, object], sizes: list[int], seed: int) -> list[tuple[str, object]]:
    """Random blocks of ``size`` neurons of each MLP layer in ``layers`` (``LayerProblem.subproblem``)."""
    cases = []
    for name, problem in layers.items():
        for size in sizes:
            generator = torch.Generator().manual_seed(seed + size)
            groups = torch.randperm(problem.num_groups, generator=generator)[:size].sort().values.tolist()
            cases.append((f"{name}[{size}]", problem.subproblem(groups)))
    return cases


def bnb_proofs(cases: list[tuple[str, object]], time_limit: float, scip_sizes: set[int]) -> list[dict]:
    rows = []
    for name, problem in cases:
        keep = problem.num_groups // 2
        local = solve(problem, keep, "local-search")
        row = {"problem": name, "groups": problem.num_groups, "keep": keep, "local_search_loss": local.loss}
        solution = solve(problem, keep, "bnb", time_limit=time_limit, warm_start=list(local.support))
        row["bnb"] = {"status": solution.status, "loss": solution.loss, "lower_bound": solution.lower_bound,
                      "gap": solution.gap, "seconds": solution.seconds, "nodes": solution.info["nodes"],
                      "root_gap": (solution.loss - solution.info.get("root_bound", solution.loss)) / solution.loss,
                      "local_search_optimal": solution.status == "optimal"
                      and local.loss <= solution.loss * (1 + 1e-9)}
        if problem.num_groups in scip_sizes:
            peer = solve(problem, keep, "scip", time_limit=min(time_limit, SCIP_PEER_SECONDS),
                         warm_start=list(local.support))
            row["scip"] = {"status": peer.status, "loss": peer.loss, "gap": peer.gap, "seconds": peer.seconds}
        rows.append(row)
        print(format_bnb_row(row), flush=True)
    return rows


def bnb_header() -> str:
    return " | ".join([f"{'problem':>20}", "groups", "keep", f"{'bnb status':>11}", f"{'seconds':>8}",
                       f"{'nodes':>7}", "root gap", "final gap", "LS=opt", f"{'scip':>22}"])


def format_bnb_row(row: dict) -> str:
    bnb = row["bnb"]
    scip = row.get("scip")
    peer = f"{scip['status'][:10]} {scip['seconds']:.1f}s" if scip else "-"
    return " | ".join([f"{row['problem']:>20}", f"{row['groups']:>6}", f"{row['keep']:>4}", f"{bnb['status']:>11}",
                       f"{bnb['seconds']:>7.1f}s", f"{bnb['nodes']:>7}", f"{bnb['root_gap']:>8.1%}",
                       f"{bnb['gap']:>9.1e}", f"{'yes' if bnb['local_search_optimal'] else '-':>6}", f"{peer:>22}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads-blocks", type=int, nargs="*", default=[3])
    parser.add_argument("--heads-backends", nargs="*", default=HEADS_BACKENDS, choices=HEADS_BACKENDS,
                        help="exact backends (outer approximation) of section 2")
    parser.add_argument("--ffn-blocks", type=int, nargs="*", default=[0, 3])
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--skip-random", action="store_true", help="skip part 1")
    parser.add_argument("--skip-heads", action="store_true", help="skip part 2")
    parser.add_argument("--skip-relaxations", action="store_true", help="skip part 3")
    parser.add_argument("--skip-bnb", action="store_true", help="skip part 4")
    parser.add_argument("--shift-iterations", type=int, default=40, help="steps of the shift search (part 3)")
    parser.add_argument("--conv-max-groups", type=int, default=64, help="largest digits conv layer of part 3")
    parser.add_argument("--conv-layers", type=int, default=6, help="digits conv layers of part 3 (the first ones)")
    parser.add_argument("--bnb-sizes", type=int, nargs="*", default=[32, 48, 64])
    parser.add_argument("--bnb-time-limit", type=float, default=600.0)
    parser.add_argument("--bnb-models", nargs="*", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--smollm2-block", type=int, default=5)
    parser.add_argument("--bnb-minilm-block", type=int, default=3,
                        help="MiniLM FFN layer of part 4 (among --ffn-blocks)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "certify.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    root = Path(__file__).resolve().parent.parent
    out = args.out.resolve()
    settings = {**vars(args), "out": str(out.relative_to(root) if out.is_relative_to(root) else out)}
    results: dict[str, object] = {"settings": settings}
    previous = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
    results["uptime_before"] = _load_average()

    if not args.skip_random:
        print("== 1. structured random head-like problems (12 groups x 4 columns, 3 outputs): time to prove optimality")
        randoms = {f"random-seed{s}": random_problem([4] * 12, outputs=3, seed=s) for s in (0, 1)}
        print(proof_header(COMBOS))
        results["random"] = proofs(randoms, lambda p: [3, 6, 9], args.time_limit, COMBOS)

    blocks = sorted(set(args.heads_blocks) | set(args.ffn_blocks))
    layers = {}
    if not (args.skip_heads and args.skip_relaxations and args.skip_bnb):
        begin = time.perf_counter()
        layers = minilm_layer_problems(samples=args.samples, blocks=blocks)
        print(f"\n(built {len(layers)} real MiniLM layer problems in {time.perf_counter() - begin:.1f}s)")
    heads = {name: p for name, p in layers.items() if name.endswith("heads") and int(name[5]) in args.heads_blocks}
    ffn = {name: p for name, p in layers.items() if name.endswith("ffn") and int(name[5]) in args.ffn_blocks}

    if not args.skip_heads:
        print("\n== 2. all-MiniLM-L6-v2 attention output layers (12 heads x 32 columns): time to prove optimality")
        real_combos = [(name, "branch-and-bound" if name == "bnb" else "outer-approximation")
                       for name in HEADS_BACKENDS if name in args.heads_backends]
        if "gurobi" in args.heads_backends:
            real_combos.append(("gurobi", "miqp"))
        print(proof_header(real_combos))
        results["heads"] = proofs(heads, lambda p: list(range(1, p.num_groups)), args.time_limit, real_combos)

        print(f"\n== 2b. scip (one branch-and-cut tree) against gurobi: goal <= {GOAL_SECONDS:.0f} s and <= "
              f"{GOAL_RATIO:.0f}x gurobi per keep, time limit {args.time_limit:.0f} s, torch threads {args.threads}")
        results["heads_scip"] = scip_against_gurobi(results["heads"])
        print(format_scip_table(results["heads_scip"]))

    if not args.skip_relaxations:
        print("\n== 3. relaxation bounds: certified gap of the same solution with each shift (gap to the reference "
              "loss), and the share of the scalar gap closed")
        cases = [(name, problem, keep, "enumerate") for name, problem in heads.items() for keep in (3, 6, 9)]
        cases += [(name, problem, problem.num_groups // 2, "local-search") for name, problem in ffn.items()]
        from digits_layers import digits_conv_problems

        tick = time.perf_counter()
        convs = digits_conv_problems(max_groups=args.conv_max_groups)
        print(f"(trained a digits ResNet18 and built {len(convs)} conv layer problems in "
              f"{time.perf_counter() - tick:.1f}s)")
        cases += [(f"digits.{name}", problem, problem.num_groups // 2, "bnb")
                  for name, problem in list(convs.items())[:args.conv_layers]]
        print(relaxation_header())
        results["relaxations"] = relaxation_gaps(cases, args.iterations, args.shift_iterations, args.time_limit)

    if not args.skip_bnb:
        print(f"\n== 4. bnb on {'/'.join(map(str, args.bnb_sizes))}-group problems cut from real MLP layers "
              f"(keep half, time limit {args.bnb_time_limit:.0f} s; scip on the 32-group ones, "
              f"limit {SCIP_PEER_SECONDS:.0f} s)")
        sources = {}
        if "minilm" in args.bnb_models:
            chosen = [name for name in ffn if name.startswith(f"block{args.bnb_minilm_block}.")] or list(ffn)
            sources.update({f"minilm.{name}": ffn[name] for name in chosen})
        if "smollm2" in args.bnb_models:
            tick = time.perf_counter()
            smol = minilm_layer_problems(samples=args.samples, blocks=[args.smollm2_block], model="smollm2")
            print(f"(built the SmolLM2 block {args.smollm2_block} problems in {time.perf_counter() - tick:.1f}s)")
            sources.update({f"smollm2.{name}": problem for name, problem in smol.items() if name.endswith("ffn")})
        print(bnb_header())
        results["bnb"] = bnb_proofs(block_problems(sources, args.bnb_sizes, seed=0), args.bnb_time_limit, {32})

    results["uptime_after"] = _load_average()
    carried = [key for key in ("random", "heads", "heads_scip", "relaxations", "bnb")
               if key not in results and key in previous]
    for key in carried:  # a skipped section keeps its rows from the earlier run
        results[key] = previous[key]
    settings["carried_over"] = carried
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(f"\nwrote {args.out}" + (f" (sections {', '.join(carried)} kept from the earlier run)" if carried else ""))


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (the machine may be shared), or None where unknown."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    main()
