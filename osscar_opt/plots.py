"""Pictures of a pruning run: the kept share per stage and structure kind (a heat map).

matplotlib is an optional dependency (the ``bench`` extra); without it :func:`keep_heatmap`
raises an ImportError that names the pip command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "plots need matplotlib: pip install 'osscar-opt[bench]' (or pip install matplotlib)"
        ) from error
    return plt


def kept_fractions(layers: list[dict[str, Any]]) -> tuple[list[str], list[int], dict[tuple[str, int], float]]:
    """``(kinds, stages, {(kind, stage): kept / groups})`` from report layer records (dicts)."""
    cells = {}
    for layer in layers:
        cells[(layer["kind"], int(layer["stage"]))] = layer["keep"] / layer["groups"]
    kinds = sorted({kind for kind, _ in cells})
    stages = sorted({stage for _, stage in cells})
    return kinds, stages, cells


def keep_heatmap(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Write a PNG heat map of the kept share per stage (columns) and structure kind (rows).

    ``report`` is :meth:`osscar_opt.pipeline.PruneReport.to_dict`'s document; structures a target's
    allocation kept whole show 1.0, other structures the run left alone are blank.
    """
    import numpy as np

    plt = _pyplot()
    layers = list(report["layers"])
    allocation = report.get("settings", {}).get("allocation")
    if allocation is not None:  # structures the allocation left whole are shown at 1.0
        pruned = {layer["name"] for layer in layers}
        layers += [
            {"kind": c["kind"], "stage": c["stage"], "keep": c["num_groups"], "groups": c["num_groups"]}
            for c in allocation["curves"] if c["name"] not in pruned
        ]
    kinds, stages, cells = kept_fractions(layers)
    if not cells:
        raise ValueError("report: no pruned layers to plot")
    grid = np.full((len(kinds), len(stages)), np.nan)
    for (kind, stage), fraction in cells.items():
        grid[kinds.index(kind), stages.index(stage)] = fraction
    figure, axes = plt.subplots(figsize=(max(4.0, 0.35 * len(stages) + 2), 0.6 * len(kinds) + 1.6))
    image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    axes.set_yticks(range(len(kinds)), kinds)
    step = max(1, len(stages) // 16)
    axes.set_xticks(range(0, len(stages), step), [str(s) for s in stages[::step]])
    axes.set_xlabel("stage (block)")
    for row in range(len(kinds)):
        for column in range(len(stages)):
            if not np.isnan(grid[row, column]) and len(stages) <= 16:
                color = "k" if grid[row, column] > 0.6 else "w"
                axes.text(column, row, f"{grid[row, column]:.2f}", ha="center", va="center", fontsize=7, color=color)
    figure.colorbar(image, ax=axes, label="kept share")
    axes.set_title(title or "kept share per block and kind")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
