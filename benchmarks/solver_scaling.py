"""Loss and wall time of every heuristic backend on structured random layer problems.

Problems: ``H`` from correlated, low-rank-plus-noise activations (the statistics of
``X = Z M D + noise`` with a decaying spectrum, built directly in closed form so that p = 8192
does not need a huge X), ``Y = X W^T``, ``keep`` = half of the groups. Single-column groups
(p = 256, 1024, 1536 (a real MiniLM FFN), 4096, 8192) and head-shaped groups (head_dim 64; 16,
32, 64 heads).

Every case also times one Cholesky factorization of its ``H`` (float64, on ``--device``; the
median of 3 calls after one warm-up call): ``ratio_to_cholesky`` is a backend's time divided by
that, the distance of a solve from its floor (a solve cannot cost much less than one Cholesky).
``greedy`` is skipped where its time, extrapolated as ``p^3`` from the largest single-column case
already run, would exceed ``--greedy-limit`` seconds (the table says so); ratios to greedy are then
blank.

Prints a table (loss relative to greedy, time ratio greedy / backend, time / one Cholesky) and
writes JSON (with the 1-minute load average before and after each case, since the machine may be
shared) and a PNG when matplotlib is installed into benchmarks/results/.

    python benchmarks/solver_scaling.py                  # the full table
    python benchmarks/solver_scaling.py --quick          # small sizes only
    python benchmarks/solver_scaling.py --device cuda    # the same on a GPU
    python benchmarks/solver_scaling.py --threads 1      # single-threaded (steadier on a busy machine)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from osscar_opt import LayerProblem, solve

BACKENDS = ("local-search", "greedy", "activation", "magnitude")
RESULTS = Path(__file__).resolve().parent / "results"
GREEDY_LIMIT_SECONDS = 180.0


def structured_problem(columns: int, group_size: int, outputs: int, seed: int, damp: float = 1e-2) -> LayerProblem:
    """Closed-form statistics of correlated activations ``X = Z M D`` plus a small noise floor.

    ``X^T X = D (M^T diag(s) M + 1e-6 I) D`` with ``M`` of rank ``p / 2``, a spectrum ``s`` that
    decays from 1 to 1e-6 (strongly correlated, nearly low-rank inputs, as in real layers) and
    log-normal column scales ``D``. ``Y = X W^T`` with a random ``W``.
    """
    generator = torch.Generator().manual_seed(seed)
    rank = max(4, columns // 2)
    mixing = torch.randn(rank, columns, generator=generator, dtype=torch.float64) / rank**0.5
    spectrum = torch.logspace(0, -6, rank, dtype=torch.float64)
    column_scale = torch.exp(0.5 * torch.randn(columns, generator=generator, dtype=torch.float64))
    xtx = (mixing.T * spectrum) @ mixing + 1e-6 * torch.eye(columns, dtype=torch.float64)
    xtx = column_scale[:, None] * xtx * column_scale[None, :]
    weight = torch.randn(outputs, columns, generator=generator, dtype=torch.float64)
    lam = damp * float(torch.diagonal(xtx).mean())
    H = xtx + lam * torch.eye(columns, dtype=torch.float64)
    G = H @ weight.T
    c0 = float((weight @ xtx * weight).sum()) + lam * float(weight.square().sum())
    groups = torch.arange(columns).view(-1, group_size)
    return LayerProblem.from_statistics(H, G, c0, groups, lam=lam, xtx_diag=torch.diagonal(xtx), weight=weight)


def cases(quick: bool) -> list[tuple[str, int, int]]:
    single = [256, 1024] if quick else [256, 1024, 1536, 4096, 8192]
    heads = [16] if quick else [16, 32, 64]
    return [(f"p={p} single", p, 1) for p in single] + [(f"{h} heads x 64", h * 64, 64) for h in heads]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cholesky_seconds(H: torch.Tensor, repeats: int = 3) -> float:
    """Median wall time of ``repeats`` float64 Cholesky factorizations of ``H`` (after one warm-up)."""
    H = H.to(torch.float64)
    torch.linalg.cholesky(H)
    synchronize(H.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.linalg.cholesky(H)
        synchronize(H.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_solve(problem: LayerProblem, keep: int, name: str):
    synchronize(problem.device)
    solution = solve(problem, keep, backend=name)
    synchronize(problem.device)
    return solution


def run(quick: bool, seed: int, device: torch.device, greedy_limit: float) -> list[dict]:
    rows = []
    greedy_reference: tuple[int, float] | None = None  # (columns, seconds) of the largest single-column greedy run
    for label, columns, group_size in cases(quick):
        load_before = os.getloadavg()[0]
        problem = structured_problem(columns, group_size, outputs=max(64, columns // 4), seed=seed).to(device)
        keep = problem.num_groups // 2
        chol = cholesky_seconds(problem.H)
        skip_greedy = None
        if greedy_reference is not None and group_size == 1:
            estimate = greedy_reference[1] * (columns / greedy_reference[0]) ** 3
            if estimate > greedy_limit:
                skip_greedy = f"skipped: est. {estimate:.0f} s > {greedy_limit:.0f} s"
        results = {}
        for name in BACKENDS:
            if name == "greedy" and skip_greedy:
                print(f"{label:18s} {name:13s} {skip_greedy}", flush=True)
                continue
            results[name] = timed_solve(problem, keep, name)
        greedy = results.get("greedy")
        if greedy is not None and group_size == 1:
            greedy_reference = (columns, greedy.seconds)
        load_after = os.getloadavg()[0]
        for name in BACKENDS:
            solution = results.get(name)
            row = {
                "case": label,
                "columns": columns,
                "groups": problem.num_groups,
                "keep": keep,
                "backend": name,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "cholesky_seconds": chol,
                "load_before": load_before,
                "load_after": load_after,
            }
            if solution is None:
                row.update(loss=None, loss_vs_greedy=None, seconds=None, speedup_vs_greedy=None,
                           ratio_to_cholesky=None, swaps_accepted=None, skipped=skip_greedy)
                rows.append(row)
                continue
            row.update(
                loss=solution.loss,
                loss_vs_greedy=None if greedy is None else solution.loss / greedy.loss,
                seconds=solution.seconds,
                speedup_vs_greedy=None if greedy is None else greedy.seconds / solution.seconds,
                ratio_to_cholesky=solution.seconds / chol,
                swaps_accepted=solution.info.get("swaps_accepted"),
                skipped=None,
            )
            rows.append(row)
            versus = "" if greedy is None else (
                f" loss/greedy={row['loss_vs_greedy']:.6f} greedy/this={row['speedup_vs_greedy']:7.2f}"
            )
            print(
                f"{label:18s} {name:13s} loss={solution.loss:.6e} seconds={solution.seconds:8.3f} "
                f"cholesky={chol:7.3f} this/cholesky={row['ratio_to_cholesky']:7.2f}{versus}",
                flush=True,
            )
    return rows


def _number(value: float | None, width: int, spec: str) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}{spec}}"


def print_table(rows: list[dict]) -> None:
    header = (
        f"| {'case':18s} | {'backend':13s} | {'loss':>12s} | {'loss / greedy':>13s} "
        f"| {'seconds':>8s} | {'greedy time / this':>18s} | {'cholesky s':>10s} | {'this / cholesky':>15s} |"
    )
    print()
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    notes = []
    for row in rows:
        if row["skipped"]:
            notes.append(f"{row['backend']} at {row['case']}: {row['skipped']}")
            print(
                f"| {row['case']:18s} | {row['backend']:13s} | {'skipped (*)':>12s} | {'-':>13s} | {'-':>8s} "
                f"| {'-':>18s} | {row['cholesky_seconds']:10.3f} | {'-':>15s} |"
            )
            continue
        print(
            f"| {row['case']:18s} | {row['backend']:13s} | {row['loss']:12.5e} "
            f"| {_number(row['loss_vs_greedy'], 13, '.6f')} | {row['seconds']:8.3f} "
            f"| {_number(row['speedup_vs_greedy'], 18, '.2f')} | {row['cholesky_seconds']:10.3f} "
            f"| {row['ratio_to_cholesky']:15.2f} |"
        )
    for note in notes:
        print(f"(*) {note}")
    compared = [r for r in rows if r["backend"] == "local-search" and r["loss_vs_greedy"] is not None]
    worse = [r["case"] for r in compared if r["loss_vs_greedy"] > 1 + 1e-12]
    print(
        f"local-search loss <= greedy loss on {len(compared) - len(worse)} of {len(compared)} cases with greedy"
        + (f"; worse on: {', '.join(worse)}" if worse else "")
    )


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = list(dict.fromkeys(row["case"] for row in rows))
    figure, axes = plt.subplots(1, 3, figsize=(17, 4))
    for name in BACKENDS:
        selected = [next(r for r in rows if r["case"] == label and r["backend"] == name) for label in labels]
        nan = float("nan")
        axes[0].plot(labels, [nan if r["loss_vs_greedy"] is None else r["loss_vs_greedy"] for r in selected],
                     marker="o", label=name)
        axes[1].plot(labels, [nan if r["seconds"] is None else r["seconds"] for r in selected], marker="o", label=name)
        axes[2].plot(labels, [nan if r["ratio_to_cholesky"] is None else r["ratio_to_cholesky"] for r in selected],
                     marker="o", label=name)
    axes[0].set_ylabel("loss / greedy loss")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("seconds")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("seconds / one Cholesky of H")
    axes[2].set_yscale("log")
    for axis in axes:
        axis.tick_params(axis="x", rotation=30)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help='torch device of the problems ("cpu", "cuda", "cuda:1", ...)')
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's own choice); 1 gives stable timings on a shared machine",
    )
    parser.add_argument(
        "--greedy-limit", type=float, default=GREEDY_LIMIT_SECONDS,
        help="skip greedy where its extrapolated time exceeds this many seconds (default %(default)s)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    start = time.perf_counter()
    print(f"device {device}, {torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = run(args.quick, args.seed, device, args.greedy_limit)
    print_table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "solver_scaling.json").write_text(json.dumps(rows, indent=2))
    plot(rows, RESULTS / "solver_scaling.png")
    print(f"\nload average {os.getloadavg()[0]:.2f}; wrote {RESULTS / 'solver_scaling.json'} in "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
