"""Pictures of a pruning run: the kept share per stage and structure kind (a heat map), the
per-layer loss and kept share (:func:`layer_plot`), and ``osscar certify``'s gap against keep
(:func:`gap_plot`).

matplotlib is an optional dependency (the ``plot`` extra); without it :func:`keep_heatmap`
raises an ImportError that names the pip command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    from osscar_opt._extras import require

    # ImportError "plots need matplotlib: pip install 'osscar-opt[plot]' (or pip install matplotlib)" without it
    matplotlib = require("matplotlib", "plot", "plots")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "plot", "plots")


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


def search_plot(allocation: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Write a PNG of the allocation search: the kept share of every targeted structure under the
    dynamic program and after the search (one panel per structure kind, blocks on the x axis), and
    the best score against evaluations. ``allocation`` is the report's ``settings["allocation"]``
    with a ``search``."""
    search = allocation.get("search")
    if not search:
        raise ValueError("allocation: the run did not search its allocation (no 'search' in the report)")
    plt = _pyplot()
    curves = allocation["curves"]
    kinds = sorted({c["kind"] for c in curves})
    figure, axes = plt.subplots(1, len(kinds) + 1, figsize=(4.2 * (len(kinds) + 1), 3.4))
    for axis, kind in zip(axes, kinds, strict=False):
        of_kind = [c for c in curves if c["kind"] == kind]
        stages = [c["stage"] for c in of_kind]
        for label, keep, style in (("dynamic program", search["start_keep"], "o--"),
                                   ("searched", search["keep"], "s-")):
            axis.plot(stages, [keep.get(c["name"], c["num_groups"]) / c["num_groups"] for c in of_kind], style,
                      label=label, markersize=4)
        axis.set_title(kind)
        axis.set_xlabel("stage (block)")
        axis.set_ylabel("kept share")
        axis.set_ylim(0, 1.05)
        axis.legend(fontsize=7)
    trace = search["trace"]
    axes[-1].plot([t["evaluation"] for t in trace], [t["best"] for t in trace], "-", label="best")
    axes[-1].plot([t["evaluation"] for t in trace], [t["score"] for t in trace], ".", alpha=0.5, label="candidate")
    axes[-1].set_xlabel("evaluations")
    axes[-1].set_ylabel(search["metric"])
    axes[-1].set_title("search")
    axes[-1].legend(fontsize=7)
    figure.suptitle(title or "allocation search")
    figure.tight_layout()
    return _save(plt, figure, path)


def _save(plt, figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _short(name: str, width: int = 32) -> str:
    """A layer name cut from the left to ``width`` characters (the end names the layer)."""
    return name if len(name) <= width else "..." + name[len(name) - width + 3:]


def gap_plot(rows: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Write a PNG of the certified gap (%) against keep, one line per layer.

    ``rows`` are ``osscar certify`` rows (:func:`osscar_opt.commands.certify.certify_rows`, or its
    ``--json`` file): each has ``name`` (and ``file``), ``keep`` and ``heuristic_gap`` (the
    heuristic's gap to the best certified bound, a fraction).
    """
    plt = _pyplot()
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        key = (str(row.get("file", "")), str(row["name"]))
        lines.setdefault(key, []).append((int(row["keep"]), 100.0 * float(row["heuristic_gap"])))
    if not lines:
        raise ValueError("rows: no certify rows to plot")
    figure, axes = plt.subplots(figsize=(7.0, 4.5))
    names = [name for _, name in lines]
    for (file, name), points in lines.items():
        points.sort()
        label = _short(name) if names.count(name) == 1 else _short(f"{name} ({file})")
        axes.plot([k for k, _ in points], [g for _, g in points], marker="o", label=label)
    axes.set_xlabel("keep (groups kept)")
    axes.set_ylabel("certified gap (%)")
    axes.set_ylim(bottom=0.0)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7 if len(lines) > 6 else 9, ncol=2 if len(lines) > 10 else 1)
    axes.set_title(title or "certified gap of the heuristic vs keep")
    figure.tight_layout()
    return _save(plt, figure, path)


def layer_plot(report: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Write a two-panel PNG of a prune report: per-layer relative loss (log scale) and kept share.

    ``report`` is :meth:`osscar_opt.pipeline.PruneReport.to_dict`'s document; layers are drawn in
    forward order (by stage, in the report's order within a stage), one colour per structure kind.
    The top panel shows ``relative_loss`` (the layer loss over the loss of keeping nothing;
    ``loss`` where a record has no relative loss) and, where recorded, the held-out relative loss
    as hollow markers; the bottom panel shows ``keep / groups``.
    """
    plt = _pyplot()
    layers = sorted(report["layers"], key=lambda layer: int(layer.get("stage", 0)))
    if not layers:
        raise ValueError("report: no pruned layers to plot")
    relative = all(layer.get("relative_loss") is not None for layer in layers)
    losses = [float(layer["relative_loss"] if relative else layer["loss"]) for layer in layers]
    positive = [value for value in losses if value > 0]
    floor = min(positive) / 10 if positive else 1e-12  # zero losses still show on the log scale
    kinds = list(dict.fromkeys(str(layer["kind"]) for layer in layers))
    colours = {kind: plt.get_cmap("tab10")(i % 10) for i, kind in enumerate(kinds)}
    x = list(range(len(layers)))
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, 0.12 * len(layers) + 3.0), 6.0))
    top.plot(x, [max(v, floor) for v in losses], color="0.75", linewidth=0.8, zorder=1)
    for kind in kinds:
        index = [i for i in x if str(layers[i]["kind"]) == kind]
        top.scatter(index, [max(losses[i], floor) for i in index], color=colours[kind], label=kind, s=18, zorder=2)
        bottom.bar(index, [layers[i]["keep"] / layers[i]["groups"] for i in index], color=colours[kind], label=kind)
        heldout = [i for i in index if layers[i].get("heldout_relative_loss") is not None]
        if heldout:
            top.scatter(heldout, [max(float(layers[i]["heldout_relative_loss"]), floor) for i in heldout],
                        facecolors="none", edgecolors=[colours[kind]], s=30, zorder=2)
    if any(layer.get("heldout_relative_loss") is not None for layer in layers):
        top.scatter([], [], facecolors="none", edgecolors="0.4", s=30, label="held-out (hollow)")
    top.set_yscale("log")
    top.set_ylabel("relative loss (loss / c0)" if relative else "loss")
    top.grid(True, which="major", alpha=0.3)
    top.legend(fontsize=8)
    bottom.set_ylabel("kept share")
    bottom.set_ylim(0.0, 1.05)
    bottom.grid(True, axis="y", alpha=0.3)
    stages = [int(layer.get("stage", 0)) for layer in layers]
    starts = [i for i in x if i == 0 or stages[i] != stages[i - 1]]
    step = max(1, len(starts) // 16)
    bottom.set_xticks(starts[::step], [str(stages[i]) for i in starts[::step]])
    bottom.set_xlabel("layer in forward order (ticks: first layer of each stage)")
    top.set_title(title or "per-layer reconstruction loss and kept share")
    figure.tight_layout()
    return _save(plt, figure, path)
