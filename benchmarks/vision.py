"""Vision benchmark: one-shot channel pruning of digits-trained ResNet18 and MobileNetV2.

Both networks are stock torchvision models trained here on scikit-learn's digits (upsampled; no
download needed). Their internal channels (ResNet block channels, MobileNetV2 hidden channels) are
pruned at 30% and 50% by the osscar_opt backends (local-search, greedy, activation, magnitude;
sequential calibration, exact re-fit of the consumer weights) and by Torch-Pruning's
``MagnitudeImportance`` on the same channel groups with the same per-unit budget (its structural
pruning, no re-fit, no fine-tuning) as the outside peer. Reported: digits test accuracy, MACs,
parameters, latency (median of repeated forward passes on one batch) and pruning wall time.

Usage: ``python benchmarks/vision.py [--quick]``; writes ``benchmarks/results/vision.json`` and
``vision.png``. Needs the ``bench`` extra (scikit-learn, matplotlib, torch-pruning).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osscar_opt.adapters.registry import adapter_for
from osscar_opt.budget import keep_count
from osscar_opt.data import digits as vision_data
from osscar_opt.pipeline import prune_vision

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("local-search", "greedy", "activation", "magnitude", "torch-pruning")
ARCHITECTURES = {"resnet18": {"image_size": 32, "epochs": 6}, "mobilenet_v2": {"image_size": 64, "epochs": 6}}


def macs_and_params(model: nn.Module, image: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on ``image`` (1, 3, S, S) and parameter count."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, image)
    return int(macs), int(params)


@torch.no_grad()
def latency_ms(model: nn.Module, batch: torch.Tensor, repeats: int = 15) -> float:
    """Median wall time (milliseconds) of a forward pass on ``batch`` in eval mode, after warm-up."""
    model.eval()
    for _ in range(3):
        model(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def torch_pruning_peer(model: nn.Module, sparsity: float, image: torch.Tensor) -> nn.Module:
    """Torch-Pruning magnitude pruning of the same units with the same per-unit budget."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=image)
    importance = tp.importance.MagnitudeImportance(p=2)
    for structure in adapter_for(pruned).structures():
        producer = structure.producers[0].module
        channels = producer.out_channels
        group = graph.get_pruning_group(producer, tp.prune_conv_out_channels, idxs=list(range(channels)))
        scores = importance(group)
        drop = torch.argsort(scores)[: channels - keep_count(channels, sparsity)].tolist()
        graph.get_pruning_group(producer, tp.prune_conv_out_channels, idxs=drop).prune()
    return pruned


def measure(model: nn.Module, test: vision_data.ImageSplit, image: torch.Tensor, batch: torch.Tensor) -> dict[str, Any]:
    macs, params = macs_and_params(model, image)
    return {
        "accuracy": vision_data.accuracy(model, test),
        "macs": macs,
        "params": params,
        "latency_ms": latency_ms(model, batch),
    }


def run_architecture(architecture: str, sparsities: list[float], samples: int, epochs: int,
                     methods=METHODS, targets=("pruned-input",), damps=(1e-2,)) -> list[dict[str, Any]]:
    settings = ARCHITECTURES[architecture]
    model, train, test, info = vision_data.digits_model(
        architecture, image_size=settings["image_size"], epochs=epochs or settings["epochs"]
    )
    image = test.images[:1].contiguous()
    batch = test.images[:64].contiguous()
    calibration = train.images[:samples].contiguous()
    rows = [{"architecture": architecture, "method": "dense", "sparsity": 0.0, "prune_seconds": 0.0,
             "train_seconds": info["train_seconds"], **measure(model, test, image, batch)}]
    print(f"{architecture}: dense test accuracy {100 * rows[0]['accuracy']:.1f}% "
          f"(trained {info['train_seconds']:.0f}s)", flush=True)
    for sparsity in sparsities:
        for method in methods:
            variants = [("-", "-")] if method == "torch-pruning" else [(t, d) for t in targets for d in damps]
            for target, damp in variants:
                start = time.perf_counter()
                if method == "torch-pruning":
                    pruned = torch_pruning_peer(model, sparsity, image)
                else:
                    pruned, _ = prune_vision(model, calibration, {"channels": sparsity}, backend=method,
                                             batch_size=32, target=target, damp=damp, progress=False)
                seconds = time.perf_counter() - start
                row = {"architecture": architecture, "method": method, "target": target, "damp": damp,
                       "sparsity": sparsity, "prune_seconds": seconds, **measure(pruned, test, image, batch)}
                rows.append(row)
                print(f"  {method:14s} {target:12s} {damp!s:5s} {sparsity:.0%}: accuracy "
                      f"{100 * row['accuracy']:.1f}%, {seconds:.1f}s", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'model':13s} {'method':14s} {'target':12s} {'damp':5s} {'sparsity':>8s} {'test acc %':>10s} "
              f"{'MMACs':>8s} {'params M':>8s} {'latency ms':>10s} {'prune s':>8s}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['architecture']:13s} {row['method']:14s} {row.get('target', '-'):12s} {row.get('damp', '-')!s:5s} "
            f"{row['sparsity']:8.0%} {100 * row['accuracy']:10.1f} "
            f"{row['macs'] / 1e6:8.1f} {row['params'] / 1e6:8.3f} {row['latency_ms']:10.1f} {row['prune_seconds']:8.1f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    architectures = list(dict.fromkeys(row["architecture"] for row in rows))
    figure, axes = plt.subplots(1, len(architectures), figsize=(5 * len(architectures), 4), squeeze=False)
    for axis, architecture in zip(axes[0], architectures, strict=True):
        dense = next(r for r in rows if r["architecture"] == architecture and r["method"] == "dense")
        def label_of(r: dict[str, Any]) -> str:
            return r["method"] if r.get("target", "-") == "-" else f"{r['method']} {r['target']} {r['damp']}"

        pruned_rows = [r for r in rows if r["architecture"] == architecture and r["method"] != "dense"]
        for label in dict.fromkeys(label_of(r) for r in pruned_rows):
            points = sorted((r["sparsity"], r["accuracy"]) for r in pruned_rows if label_of(r) == label)
            points = [(0.0, dense["accuracy"]), *points]
            style = "--" if "dense-output" in label else "-"
            axis.plot([100 * s for s, _ in points], [100 * a for _, a in points], style, marker="o", label=label)
        axis.set_title(f"{architecture} on digits (one shot, no fine-tuning)")
        axis.set_xlabel("internal channels removed (%)")
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--samples", type=int, default=128, help="calibration images")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default per architecture)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--targets", nargs="+", default=["pruned-input"], choices=["pruned-input", "dense-output"])
    parser.add_argument("--damps", nargs="+", default=[1e-2], type=lambda t: t if t == "auto" else float(t))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="2 epochs, 32 calibration images, 50%% only")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.samples, args.sparsities = 2, 32, [0.5]
    torch.manual_seed(0)
    start = time.perf_counter()
    rows = []
    for architecture in args.architectures:
        rows.extend(run_architecture(architecture, args.sparsities, args.samples, args.epochs, args.methods,
                                     args.targets, args.damps))
    print()
    print(table(rows))
    print(f"\ntotal {time.perf_counter() - start:.0f}s, torch threads {torch.get_num_threads()}, "
          f"calibration images {args.samples}, latency batch 64")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vision.json").write_text(json.dumps({"rows": rows, "samples": args.samples}, indent=1))
    plot(rows, args.out / "vision.png")
    print(f"wrote {args.out / 'vision.json'} and {args.out / 'vision.png'}")


if __name__ == "__main__":
    main()
