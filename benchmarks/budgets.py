"""Speed-target benchmark (issue 10): uniform against allocated per-layer budgets at the same target.

For every model and target (``macs:0.7`` keeps 70% of the dense MACs, ``speedup:1.5`` asks for a
forward pass 1.5x as fast on this machine), two budgets are computed once:

* ``uniform``: every layer of a kind keeps the same share; the shares of heads and neurons are
  chosen by the same dynamic program on the kinds' summed loss curves;
* ``allocated``: every structure's keep from the loss curves (:class:`osscar_opt.budget.CostTarget`).

Both budgets are then pruned with each backend (``local-search``, ``greedy``, ``activation``; the
budget is computed once per target and mode and re-used through ``PerLayerKeep``, so every backend
cuts the same number of groups per layer). Reported per row: quality (embedding cosine to dense and
retrieval top-1 for all-MiniLM-L6-v2, perplexity on held-out Shakespeare for SmolLM2-135M, digits
test accuracy for the digits-trained ResNet18 / MobileNetV2), achieved MACs and parameters as
fractions of dense, measured latency on the evaluation batch (median and range of 15 repeats) and the
measured speed-up, the allocation's predicted cost fraction and (first backend of each budget) the
pruned model's cost fraction re-measured by the pipeline on the calibration batch the cost tables
were built on (for speed-up targets: pruned / dense latency, so ``1 / achieved`` is the speed-up
there), and the pruning wall time (curves + allocation + pruning).

Writes ``benchmarks/results/budgets.json`` (after every row) and ``budgets.png`` (quality against
achieved speed-up, one line per method). Run alone on an idle machine:

    python benchmarks/budgets.py --models minilm --targets macs:0.7 macs:0.5 speedup:1.5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from osscar_opt import evaluate
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.budget import CostTarget, PerLayerKeep
from osscar_opt.costs import model_cost
from osscar_opt.pipeline import prune

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("minilm", "smollm2", "resnet18", "mobilenet_v2")
BACKENDS = ("local-search", "greedy", "activation")
MODES = ("uniform", "curves", "stock")
DEFAULT_MODES = ("uniform", "curves")
# "stock": uniform widths over the structure kinds the family's config can state
# (adapter.config_kinds()), so stock from_pretrained reloads the result: what --uniform-widths costs.


class Subject:
    """A model, its calibration data and how one of its pruned copies is scored."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        if name in ("minilm", "smollm2"):
            self._load_text(name, args)
        else:
            self._load_vision(name, args)

    def _load_text(self, name: str, args: argparse.Namespace) -> None:
        from osscar_opt.data import text
        from osscar_opt.models import load_model

        loaded = load_model(None if name == "minilm" else "smollm2", device="cpu")
        samples = args.minilm_samples if name == "minilm" else args.smollm2_samples
        self.model, self.tokenizer, self.batch_size = loaded.model, loaded.tokenizer, 8
        self.calibration = text.calibration_ids(
            loaded.tokenizer, text.load_texts(None, "calib", loaded.causal), samples, args.seq_len)
        self.eval_data = evaluate.make_eval_data(
            loaded.tokenizer, text.load_texts(None, "eval", loaded.causal), loaded.causal, seq_len=args.seq_len,
            max_windows=args.perplexity_windows)
        self.quality = "perplexity" if loaded.causal else "cosine_to_dense"
        self.dense = evaluate.evaluate_model(self.model, self.tokenizer, self.eval_data, speed=False)
        self.cost_batch = {"input_ids": self.eval_data.batch["input_ids"]}

    def _load_vision(self, name: str, args: argparse.Namespace) -> None:
        from osscar_opt.data import digits

        settings = {"resnet18": (32, 6), "mobilenet_v2": (64, 6)}[name]
        self.model, train, self.test, _ = digits.digits_model(name, image_size=settings[0], epochs=settings[1])
        self.model.eval()
        self.calibration = train.images[: args.vision_samples].contiguous()
        self.batch_size = 32
        self.quality = "accuracy"
        self.cost_batch = {"x": self.test.images[:64].contiguous()}
        self.dense = {"accuracy": digits.accuracy(self.model, self.test)}

    def score(self, model: torch.nn.Module) -> dict[str, Any]:
        """Quality, MACs, parameters and latency (median, min, max of repeats) of ``model``."""
        if hasattr(self, "test"):
            from osscar_opt.data import digits

            result = {"accuracy": digits.accuracy(model, self.test)}
        else:
            result = evaluate.public(evaluate.evaluate_model(model, self.tokenizer, self.eval_data, self.dense,
                                                             speed=False))
        batch = next(iter(self.cost_batch.values()))
        result["macs"] = model_cost(model, batch, "macs")
        result["params"] = model_cost(model, batch, "params")
        median, low, high = evaluate.time_call(lambda: model(batch), repeats=15, warmup=2)
        result.update(latency_ms=median, latency_min_ms=low, latency_max_ms=high)
        return result


def parse_target(text: str) -> tuple[str, float]:
    metric, _, value = text.partition(":")
    return metric, float(value)


def run_subject(subject: Subject, args: argparse.Namespace, rows: list[dict[str, Any]], save) -> None:
    dense = {**evaluate.public(subject.dense), **subject.score(subject.model)}
    rows.append({"model": subject.name, "method": "dense", "mode": "-", "target": "-", **dense})
    save()
    print(f"{subject.name}: dense {subject.quality} {dense[subject.quality]:.4f}, latency {dense['latency_ms']:.1f} ms",
          flush=True)
    for target_text in args.targets:
        metric, value = parse_target(target_text)
        for mode in args.modes:
            keep, allocation, curve_seconds = None, None, 0.0
            stock_kinds = getattr(adapter_for(subject.model), "config_kinds", lambda: None)()
            if mode == "stock" and stock_kinds is None:
                print(f"  {target_text:12s} stock: {subject.name} has no config to state widths in; skipped")
                continue
            for backend in args.backends:
                model = copy.deepcopy(subject.model)
                start = time.perf_counter()
                if keep is None and mode == "stock":
                    budget = CostTarget(metric, value, kinds=sorted(stock_kinds), allocation="uniform",
                                        normalize=args.normalize)
                elif keep is None:
                    budget = CostTarget(metric, value, allocation=mode, normalize=args.normalize,
                                        reallocate=args.reallocate and mode == "curves")
                else:
                    budget = PerLayerKeep(keep)
                report = prune(model, subject.calibration, budget, backend=backend, batch_size=subject.batch_size,
                               progress=False)
                seconds = time.perf_counter() - start
                if keep is None:
                    allocation = report.settings["allocation"]
                    keep, curve_seconds = allocation["keep"], allocation["seconds"]
                result = subject.score(model)
                row = {
                    "model": subject.name, "method": backend, "mode": mode, "target": target_text,
                    **result,
                    "macs_fraction": result["macs"] / dense["macs"],
                    "params_fraction": result["params"] / dense["params"],
                    "speedup": dense["latency_ms"] / result["latency_ms"],
                    "predicted_fraction": allocation["predicted_fraction"],
                    # the pruned model re-measured by the pipeline on the batch the tables were built on
                    "achieved_fraction": allocation["achieved_fraction"] if backend == args.backends[0] else None,
                    "prune_seconds": seconds + (0.0 if backend == args.backends[0] else curve_seconds),
                    "curve_seconds": curve_seconds, "keep": keep,
                    "stock_loadable": report.settings.get("config_describes_pruned_model"),
                }
                rows.append(row)
                save()
                print(f"  {target_text:12s} {mode:8s} {backend:13s} {subject.quality} {row[subject.quality]:.4f} "
                      f"MACs {row['macs_fraction']:.3f} params {row['params_fraction']:.3f} "
                      f"speed-up {row['speedup']:.2f} ({seconds:.0f} s)", flush=True)
                del model


def table(rows: list[dict[str, Any]]) -> str:
    header = ("| model | target | budget | backend | quality | MACs | params | latency ms (range) | speed-up "
              "| predicted | achieved | prune s | stock reload |")
    lines = [header, "|" + "---|" * 13]
    for row in rows:
        quality = row.get("perplexity", row.get("cosine_to_dense", row.get("accuracy")))
        if row["method"] == "dense":
            lines.append(f"| {row['model']} | dense | - | - | {quality:.4f} | 1 | 1 | {row['latency_ms']:.1f} "
                         f"({row['latency_min_ms']:.1f}-{row['latency_max_ms']:.1f}) | 1 | - | - | - | - |")
            continue
        lines.append(
            f"| {row['model']} | {row['target']} | {row['mode']} | {row['method']} | {quality:.4f} | "
            f"{row['macs_fraction']:.3f} | {row['params_fraction']:.3f} | {row['latency_ms']:.1f} "
            f"({row['latency_min_ms']:.1f}-{row['latency_max_ms']:.1f}) | {row['speedup']:.2f} | "
            f"{row['predicted_fraction']:.3f} | "
            f"{'-' if row.get('achieved_fraction') is None else format(row['achieved_fraction'], '.3f')} | "
            f"{row['prune_seconds']:.0f} | {_yes_no(row.get('stock_loadable'))} |"
        )
    return "\n".join(lines)


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for axis, name in zip(axes[0], models, strict=True):
        pruned = [r for r in rows if r["model"] == name and r["method"] != "dense"]
        dense = next(r for r in rows if r["model"] == name and r["method"] == "dense")
        key = "perplexity" if "perplexity" in dense else ("cosine_to_dense" if "cosine_to_dense" in dense
                                                          else "accuracy")
        for label in dict.fromkeys((r["mode"], r["method"]) for r in pruned):
            points = sorted((1 / r["macs_fraction"], r[key]) for r in pruned if (r["mode"], r["method"]) == label)
            axis.plot([p[0] for p in points], [p[1] for p in points], "-" if label[0] == "curves" else "--",
                      marker="o", label=f"{label[1]} {'allocated' if label[0] == 'curves' else 'uniform'}")
        axis.set_title(f"{name}: dense {key} {dense[key]:.3f}")
        axis.set_xlabel("dense MACs / pruned MACs")
        axis.set_ylabel(key)
        if key == "perplexity":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--targets", nargs="+", default=["macs:0.7", "macs:0.5"],
                        help="metric:value pairs, e.g. macs:0.7 params:0.7 speedup:1.5")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES,
                        help="uniform, curves (default both) and stock: uniform widths over the kinds the "
                        "model's config can state, i.e. what --uniform-widths costs")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--normalize", default="stage", choices=["relative", "stage"])
    parser.add_argument("--reallocate", action="store_true")
    parser.add_argument("--minilm-samples", type=int, default=128)
    parser.add_argument("--smollm2-samples", type=int, default=64)
    parser.add_argument("--vision-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--perplexity-windows", type=int, default=32)
    parser.add_argument("--out", default="budgets", help="result file stem under benchmarks/results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    path = RESULTS / f"{args.out}.json"

    def save() -> None:
        path.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))

    for name in args.models:
        run_subject(Subject(name, args), args, rows, save)
    print(table(rows))
    plot(rows, RESULTS / f"{args.out}.png")
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
