"""Batch throughput on every executor, and a projection of wall time for all layers of OPT-30B.

Part 1 (measured): the real layer problems of all-MiniLM-L6-v2 (benchmarks/minilm_layers.py: per
block the 12-head attention output projection, 384 columns, and the 1536-neuron FFN output
projection) times 3 budgets (keep 75%, 50%, 25% of the groups) times 3 backends (local-search,
greedy, activation), on ``serial`` and on ``processes`` and ``ray`` with 1 and 2 workers, through
``osscar_opt.batch``. Reported: wall time (executor start-up included), throughput against
serial in the same run, overhead per task ((wall x workers - summed task time) / tasks), and
whether every row equals the serial one (same support; the largest relative loss difference, which
is round-off when the thread counts differ). Serial runs twice: on the default torch threads (all
cores: BLAS already uses both cores of this machine inside one task) and on one thread (what each
worker gets when there are as many workers as cores).

Part 2 (a projection, not a measurement): local search's measured seconds per problem at
p = 1024..8192 (benchmarks/results/solver_scaling.json; run benchmarks/solver_scaling.py first,
on the device the projection is for) fitted by a power law in p, extrapolated to OPT-30B's
layers: 48 blocks, each one attention problem (56 heads of 128: p = 7168, 56 groups) and one FFN
problem (p = 28,672 single-column groups), keep half; the makespan on 1, 8 and 64 workers by
longest-task-first scheduling. Calibration (the Gram matrices) and surgery are not included.

    python benchmarks/batch.py            # both parts (about 5 minutes on 2 cores)
    python benchmarks/batch.py --quick    # 4 problems, 2 backends
    python benchmarks/batch.py --projection-only
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARES = (0.75, 0.5, 0.25)
BACKENDS = ("local-search", "greedy", "activation")
# (executor, workers, torch threads per task: None = the executor's default)
CONFIGS = (("serial", None, None), ("serial", None, 1), ("processes", 1, None), ("processes", 2, None),
           ("ray", 1, None), ("ray", 2, None))
OPT30B = {"blocks": 48, "heads": 56, "head_dim": 128, "ffn": 28_672}


def batch_tasks(problems: list, backends: tuple[str, ...]):
    from osscar_opt.batch import Task, problem_sources

    sources = problem_sources(problems)
    tasks = [Task("solve", index, {"backend": backend, "keep": max(1, round(share * source.groups)), "options": {}})
             for index, source in enumerate(sources) for backend in backends for share in SHARES]
    return sources, tasks


def measure(problems: list, backends: tuple[str, ...], configs) -> list[dict]:
    from osscar_opt.batch import run_tasks
    from osscar_opt.executors import make_executor

    sources, tasks = batch_tasks(problems, backends)
    rows, reference = [], None
    for name, workers, threads in configs:
        load_before = os.getloadavg()[0]
        begin = time.perf_counter()
        executor = make_executor(name, workers)
        try:
            started = time.perf_counter() - begin
            results = run_tasks(sources, tasks, executor, threads=threads)
        finally:
            executor.close()
        wall = time.perf_counter() - begin
        failed = [row for row in results if row["status"] == "error"]
        if failed:
            raise RuntimeError(f"{name}: {len(failed)} tasks failed, first: {failed[0]['error']}")
        essentials = [(tuple(row["support"]), row["loss"]) for row in results]
        reference = essentials if reference is None else reference
        busy = sum(row["seconds"] for row in results)
        count = workers or 1
        drift = max(abs(a[1] - b[1]) / b[1] for a, b in zip(essentials, reference, strict=True))
        rows.append({"executor": name, "workers": count, "threads": threads or "default", "tasks": len(tasks),
                     "wall_seconds": wall, "max_relative_loss_difference": drift,
                     "startup_seconds": started, "task_seconds": busy,
                     "throughput": len(tasks) / wall, "overhead_per_task": (wall * count - busy) / len(tasks),
                     "same_supports_as_serial": sum(a[0] == b[0] for a, b in zip(essentials, reference, strict=True)),
                     "same_rows_as_serial": essentials == reference, "load_before": load_before,
                     "load_after": os.getloadavg()[0]})
        print(f"  {name:9s} x{count} threads {threads or 'default'}: {wall:7.1f} s wall ({started:.1f} s start-up), "
              f"{busy:7.1f} s in tasks", flush=True)
    serial = rows[0]["throughput"]
    for row in rows:
        row["speedup_vs_serial"] = row["throughput"] / serial
    return rows


def power_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """``(a, b)`` of ``seconds = a * p**b``, least squares in log-log."""
    xs = [math.log(p) for p, _ in points]
    ys = [math.log(s) for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - slope * mx), slope


def makespan(durations: list[float], workers: int) -> float:
    """Longest-task-first schedule of ``durations`` on ``workers`` identical workers."""
    loads = [0.0] * min(workers, len(durations))
    heapq.heapify(loads)
    for duration in sorted(durations, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + duration)
    return max(loads)


def projection(scaling: list[dict]) -> dict:
    local = [row for row in scaling if row["backend"] == "local-search" and row.get("seconds")]
    single = [(row["columns"], row["seconds"]) for row in local if row["groups"] == row["columns"]
              and row["columns"] >= 1024]
    heads = [(row["columns"], row["seconds"]) for row in local if row["groups"] != row["columns"]
             and row["columns"] >= 1024]
    if len(single) < 2 or len(heads) < 2:
        raise ValueError("the solver-scaling results need local-search rows at two or more p >= 1024 for single "
                         "columns and for heads; run benchmarks/solver_scaling.py (not --quick) first")
    fit_single, fit_heads = power_fit(single), power_fit(heads)
    p_heads, p_ffn = OPT30B["heads"] * OPT30B["head_dim"], OPT30B["ffn"]
    t_heads = fit_heads[0] * p_heads ** fit_heads[1]
    t_ffn = fit_single[0] * p_ffn ** fit_single[1]
    durations = [t_heads, t_ffn] * OPT30B["blocks"]
    device = sorted({row.get("device", "cpu") for row in local})
    return {"device": device, "fit_single": {"a": fit_single[0], "b": fit_single[1], "points": single},
            "fit_heads": {"a": fit_heads[0], "b": fit_heads[1], "points": heads},
            "attention_problem_seconds": t_heads, "ffn_problem_seconds": t_ffn,
            "problems": len(durations), "serial_seconds": sum(durations),
            "makespan_seconds": {str(w): makespan(durations, w) for w in (1, 8, 64)},
            "h_bytes_ffn": p_ffn * p_ffn * 8}


def print_measured(rows: list[dict]) -> None:
    print("\nexecutor   workers  threads  tasks  wall s  start s  tasks/s  vs serial  vs serial 1 thr  "
          "overhead s/task  same supports  max loss diff")
    single = next((row["throughput"] for row in rows if row["executor"] == "serial" and row["threads"] == 1), None)
    for row in rows:
        versus = f"{row['throughput'] / single:13.2f}x" if single else f"{'-':>14s}"
        print(f"{row['executor']:9s}  {row['workers']:7d}  {row['threads']!s:>7s}  {row['tasks']:5d}  "
              f"{row['wall_seconds']:6.1f}  {row['startup_seconds']:7.1f}  {row['throughput']:7.2f}  "
              f"{row['speedup_vs_serial']:8.2f}x  {versus}  {row['overhead_per_task']:15.3f}  "
              f"{row['same_supports_as_serial']:>6d}/{row['tasks']:<6d}  {row['max_relative_loss_difference']:.1e}")
    loads = [row["load_before"] for row in rows] + [row["load_after"] for row in rows]
    print(f"load average during the runs: {min(loads):.2f} .. {max(loads):.2f} (2 cores; above ~2.5 other jobs ran)")


def print_projection(result: dict) -> None:
    fs, fh = result["fit_single"], result["fit_heads"]
    print(f"\nPROJECTION (not measured) for OPT-30B, local search, device {', '.join(result['device'])}:")
    print(f"  fit single-column: t = {fs['a']:.3g} * p^{fs['b']:.2f} s from p = {[p for p, _ in fs['points']]}")
    print(f"  fit heads:         t = {fh['a']:.3g} * p^{fh['b']:.2f} s from p = {[p for p, _ in fh['points']]}")
    print(f"  one attention problem (p = 7168, 56 heads): {result['attention_problem_seconds']:.1f} s; one FFN "
          f"problem (p = 28,672): {result['ffn_problem_seconds']:.0f} s (H alone is "
          f"{result['h_bytes_ffn'] / 2**30:.1f} GiB in float64)")
    spans = result["makespan_seconds"].items()
    print(f"  {result['problems']} problems: " + ", ".join(
        f"{w} worker{'s' if w != '1' else ''} {seconds / 3600:.2f} h" for w, seconds in spans))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 problems (2 blocks), 2 backends")
    parser.add_argument("--projection-only", action="store_true", help="only part 2, from solver_scaling.json")
    parser.add_argument("--out", default=str(RESULTS / "batch.json"))
    args = parser.parse_args()
    document: dict = {"cores": os.cpu_count()}
    if not args.projection_only:
        from minilm_layers import minilm_layer_problems

        problems = minilm_layer_problems(blocks=[0, 5] if args.quick else None)
        for name, problem in problems.items():
            problem.meta = {"name": name, "kind": "heads" if name.endswith("heads") else "neurons"}
        backends = BACKENDS[:2] if args.quick else BACKENDS
        print(f"{len(problems)} MiniLM problems x {len(SHARES)} budgets x {len(backends)} backends")
        document["measured"] = measure(list(problems.values()), backends, CONFIGS)
        print_measured(document["measured"])
    scaling = RESULTS / "solver_scaling.json"
    if scaling.is_file():
        document["projection"] = projection(json.loads(scaling.read_text()))
        print_projection(document["projection"])
    else:
        print(f"\nno {scaling}: run benchmarks/solver_scaling.py for the projection")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
