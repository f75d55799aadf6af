"""Loss and wall time of every heuristic backend on structured random layer problems.

Problems: ``H`` from correlated, low-rank-plus-noise activations (the statistics of
``X = Z M D + noise`` with a decaying spectrum, built directly in closed form so that p = 4096
does not need a huge X), ``Y = X W^T``, ``keep`` = half of the groups. Single-column groups
(p = 256, 1024, 4096) and head-shaped groups (head_dim 64; 16, 32, 64 heads).

Prints a table (loss relative to greedy, time ratio greedy / backend) and writes JSON (and a PNG
when matplotlib is installed) into benchmarks/results/.

    python benchmarks/solver_scaling.py            # the full table
    python benchmarks/solver_scaling.py --quick    # small sizes only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from osscar_opt import LayerProblem, solve

BACKENDS = ("local-search", "greedy", "activation", "magnitude")
RESULTS = Path(__file__).resolve().parent / "results"


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
    single = [256, 1024] if quick else [256, 1024, 4096]
    heads = [16] if quick else [16, 32, 64]
    return [(f"p={p} single", p, 1) for p in single] + [(f"{h} heads x 64", h * 64, 64) for h in heads]


def run(quick: bool, seed: int) -> list[dict]:
    rows = []
    for label, columns, group_size in cases(quick):
        problem = structured_problem(columns, group_size, outputs=max(64, columns // 4), seed=seed)
        keep = problem.num_groups // 2
        results = {name: solve(problem, keep, backend=name) for name in BACKENDS}
        greedy = results["greedy"]
        for name, solution in results.items():
            rows.append(
                {
                    "case": label,
                    "columns": columns,
                    "groups": problem.num_groups,
                    "keep": keep,
                    "backend": name,
                    "loss": solution.loss,
                    "loss_vs_greedy": solution.loss / greedy.loss,
                    "seconds": solution.seconds,
                    "speedup_vs_greedy": greedy.seconds / solution.seconds,
                    "swaps_accepted": solution.info.get("swaps_accepted"),
                }
            )
            print(
                f"{label:18s} {name:13s} loss={solution.loss:.6e} loss/greedy={solution.loss / greedy.loss:.5f} "
                f"seconds={solution.seconds:8.3f} greedy/this={greedy.seconds / solution.seconds:7.2f}",
                flush=True,
            )
    return rows


def print_table(rows: list[dict]) -> None:
    header = (
        f"| {'case':18s} | {'backend':13s} | {'loss':>12s} | {'loss / greedy':>13s} "
        f"| {'seconds':>8s} | {'greedy time / this':>18s} |"
    )
    print()
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for row in rows:
        print(
            f"| {row['case']:18s} | {row['backend']:13s} | {row['loss']:12.5e} | {row['loss_vs_greedy']:13.5f} "
            f"| {row['seconds']:8.3f} | {row['speedup_vs_greedy']:18.2f} |"
        )


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = list(dict.fromkeys(row["case"] for row in rows))
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name in BACKENDS:
        selected = [next(r for r in rows if r["case"] == label and r["backend"] == name) for label in labels]
        axes[0].plot(labels, [r["loss_vs_greedy"] for r in selected], marker="o", label=name)
        axes[1].plot(labels, [r["seconds"] for r in selected], marker="o", label=name)
    axes[0].set_ylabel("loss / greedy loss")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("seconds")
    axes[1].set_yscale("log")
    for axis in axes:
        axis.tick_params(axis="x", rotation=30)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    start = time.perf_counter()
    rows = run(args.quick, args.seed)
    print_table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "solver_scaling.json").write_text(json.dumps(rows, indent=2))
    plot(rows, RESULTS / "solver_scaling.png")
    print(f"\nwrote {RESULTS / 'solver_scaling.json'} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
