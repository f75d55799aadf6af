"""Certification benchmark: time to prove optimality, and certified gaps of local search.

1. Structured random head-like problems (12 groups of 4 columns, 3 outputs: small enough for the
   MIQP form under the pip Gurobi licence): every backend x formulation, several budgets.
2. Real attention-output layers of all-MiniLM-L6-v2 (12 heads of 32 columns, activations on
   stdlib docstrings): time to prove optimality at every keep, outer approximation on gurobi and
   cvxpy/SCIP (the MIQP form has 384 x 384 continuous variables: beyond the pip licence, and
   recorded as such), against enumeration.
3. Real FFN output layers (1536 single-neuron groups, keep 768): the certified gap of local search
   with the scalar and the block shift.

Prints the tables and writes JSON to benchmarks/results/certify.json.

    python benchmarks/certify.py [--heads-blocks 3] [--ffn-blocks 0 3] [--time-limit 60]
"""

from __future__ import annotations

import argparse
import json
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

COMBOS = [("gurobi", "outer-approximation"), ("gurobi", "miqp"), ("cvxpy", "outer-approximation"),
          ("cvxpy", "miqp")]


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


def ffn_gaps(problems: dict[str, object], keep: int, iterations: int) -> list[dict]:
    rows = []
    for name, problem in problems.items():
        begin = time.perf_counter()
        local = solve(problem, keep, "local-search")
        certificate = certify(problem, local, shift="both", iterations=iterations, block_iterations=25,
                              block_steps=2)
        row = {"layer": name, "groups": problem.num_groups, "keep": keep, "local_search_loss": local.loss,
               "local_search_s": local.seconds, "bound_scalar": certificate.bounds["scalar"],
               "bound_block": certificate.bounds["block"],
               "gap_scalar": (local.loss - certificate.bounds["scalar"]) / local.loss,
               "gap_block": (local.loss - certificate.bounds["block"]) / local.loss,
               "tightening": certificate.tightening, "certify_s": time.perf_counter() - begin - local.seconds}
        rows.append(row)
        print(f"{name:>12} | {problem.num_groups:>5} | {keep:>4} | {local.loss:>10.5g} | {row['bound_scalar']:>10.5g} "
              f"| {row['gap_scalar']:>7.2%} | {row['bound_block']:>10.5g} | {row['gap_block']:>7.2%} "
              f"| {row['tightening']:>6.1%} | {row['certify_s']:>6.1f}s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads-blocks", type=int, nargs="*", default=[3])
    parser.add_argument("--ffn-blocks", type=int, nargs="*", default=[0, 3])
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--skip-random", action="store_true", help="skip part 1")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    results: dict[str, object] = {"settings": vars(args)}

    if not args.skip_random:
        print("== 1. structured random head-like problems (12 groups x 4 columns, 3 outputs): time to prove optimality")
        randoms = {f"random-seed{s}": random_problem([4] * 12, outputs=3, seed=s) for s in (0, 1)}
        print(proof_header(COMBOS))
        results["random"] = proofs(randoms, lambda p: [3, 6, 9], args.time_limit, COMBOS)

    blocks = sorted(set(args.heads_blocks) | set(args.ffn_blocks))
    begin = time.perf_counter()
    layers = minilm_layer_problems(samples=args.samples, blocks=blocks)
    print(f"\n(built {len(layers)} real MiniLM layer problems in {time.perf_counter() - begin:.1f}s)")

    print("\n== 2. all-MiniLM-L6-v2 attention output layers (12 heads x 32 columns): time to prove optimality")
    heads = {name: p for name, p in layers.items() if name.endswith("heads") and int(name[5]) in args.heads_blocks}
    # cvxpy:miqp is not run here: 384 x 384 continuous variables and a dense quadratic (tens of GB in CVXPY).
    real_combos = COMBOS[:3]
    print(proof_header(real_combos))
    results["heads"] = proofs(heads, lambda p: list(range(1, p.num_groups)), args.time_limit, real_combos)

    print("\n== 3. all-MiniLM-L6-v2 FFN output layers: certified gap of local search (scalar vs block shift)")
    print(f"{'layer':>12} | groups | keep | {'LS loss':>10} | {'bound mu':>10} | {'gap mu':>7} | {'bound blk':>10} "
          f"| {'gap blk':>7} | closed | certify")
    ffn = {name: p for name, p in layers.items() if name.endswith("ffn") and int(name[5]) in args.ffn_blocks}
    results["ffn"] = ffn_gaps(ffn, 768, args.iterations)

    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "certify.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(f"\nwrote {out / 'certify.json'}")


if __name__ == "__main__":
    main()
