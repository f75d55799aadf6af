"""Speed-target benchmark (issue 10): uniform against allocated per-layer budgets at the same target.

For every model and target (``macs:0.7`` keeps 70% of the dense MACs, ``speedup:1.5`` asks for a
forward pass 1.5x as fast on this machine), the budgets of ``--modes`` are computed once:

* ``uniform``: every layer of a kind keeps the same share; the shares of heads and neurons are
  chosen by the same dynamic program on the kinds' summed loss curves;
* ``curves`` (allocated): every structure's keep from the loss curves (:class:`osscar_opt.budget.CostTarget`);
* ``search``: the allocated keeps, then searched at the same cost on the model's output
  (:class:`osscar_opt.allocation_search.AllocationSearch`, ``--search-evaluations`` candidates
  scored on ``--search-samples`` samples of every 10th calibration article, which no mode
  calibrates on; the images after the calibration images for vision models);
* ``stock``: uniform widths over the kinds the family's config can state;
* ``empty`` and ``search_empty``: ``curves`` and ``search`` with ``allow_empty``: a structure may
  keep no group, removing its whole attention layer or MLP (LLaMA layout; refused for others).

Each budget is then pruned with each backend (``local-search``, ``greedy``, ``activation``; the
budget is computed once per target and mode and re-used through ``PerLayerKeep``, so every backend
cuts the same number of groups per layer). Reported per row: quality (embedding cosine to dense and
retrieval top-1 for all-MiniLM-L6-v2, perplexity for SmolLM2-135M, on held-out wiki articles and on
each unseen text (Shakespeare, docstrings, licences; their mean is the headline off the domain), digits
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
from osscar_opt.allocation_search import SEARCH_METHODS, AllocationSearch
from osscar_opt.budget import CostTarget, PerLayerKeep
from osscar_opt.costs import model_cost
from osscar_opt.data.text import DEFAULT_SOURCE
from osscar_opt.pipeline import prune

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("minilm", "smollm2", "resnet18", "mobilenet_v2", "resnet18_fashion", "mobilenet_v2_fashion")
BACKENDS = ("local-search", "greedy", "activation")
MODES = ("uniform", "curves", "search", "stock", "empty", "search_empty")
DEFAULT_MODES = ("uniform", "curves")
MODE_LABELS = {"curves": "allocated", "search": "allocated + search", "uniform": "uniform",
               "empty": "allocated + empty sublayers", "search_empty": "allocated + search + empty sublayers"}
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
        # every 10th calibration article is the allocation search's (every mode calibrates on the rest)
        fit, held = text.hold_out_documents(text.load_texts(None, "calib", loaded.causal))
        self.calibration = text.calibration_ids(loaded.tokenizer, fit, samples, args.seq_len)
        self.search_samples = text.calibration_ids(loaded.tokenizer, held, args.search_samples, args.seq_len,
                                                   seed=text.SEED + 1)
        self.domains = {domain: evaluate.make_eval_data(
            loaded.tokenizer, text.load_texts(domain, "eval", loaded.causal), loaded.causal, seq_len=args.seq_len,
            max_windows=args.perplexity_windows) for domain in text.DOMAINS}
        self.eval_data = self.domains[text.DEFAULT_SOURCE]
        self.quality = "perplexity" if loaded.causal else "cosine_to_dense"
        self.dense_domains = {domain: evaluate.evaluate_model(self.model, self.tokenizer, data, speed=False)
                              for domain, data in self.domains.items()}
        self.dense = self.dense_domains[text.DEFAULT_SOURCE]
        self.cost_batch = {"input_ids": self.eval_data.batch["input_ids"]}

    def _load_vision(self, name: str, args: argparse.Namespace) -> None:
        from osscar_opt.data import digits, fashion

        architecture = name.removesuffix("_fashion")
        settings = {"resnet18": (32, 6), "mobilenet_v2": (64, 6)}[architecture]
        if name.endswith("_fashion"):  # real Fashion-MNIST (apt install dataset-fashion-mnist), trained once, cached
            self.model, train, self.test, info = fashion.fashion_model(architecture, image_size=settings[0],
                                                                       epochs=args.fashion_epochs)
            origin = "cached" if info["cached"] else f"trained in {info['train_seconds']:.0f} s"
            print(f"{name}: Fashion-MNIST reference, test accuracy {info['test_accuracy']:.4f} ({origin})", flush=True)
        else:
            self.model, train, self.test, _ = digits.digits_model(name, image_size=settings[0], epochs=settings[1])
        self.model.eval()
        self.calibration = train.images[: args.vision_samples].contiguous()
        self.search_samples = train.images[args.vision_samples: args.vision_samples + args.search_samples].contiguous()
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
            domains = {domain: evaluate.public(evaluate.evaluate_model(model, self.tokenizer, data,
                                                                       self.dense_domains[domain], speed=False))
                       for domain, data in self.domains.items()}
            result = dict(domains[DEFAULT_SOURCE])
            result["domains"] = {domain: value[self.quality] for domain, value in domains.items()}
            unseen = [value for domain, value in result["domains"].items() if domain != DEFAULT_SOURCE]
            result["unseen_mean"] = sum(unseen) / len(unseen)
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
            keep, allocation, curve_seconds, search_record = None, None, 0.0, None
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
                elif keep is None and mode in ("search", "search_empty"):
                    search = AllocationSearch(subject.search_samples, evaluations=args.search_evaluations,
                                              method=args.search_method, seed=0)
                    budget = CostTarget(metric, value, normalize=args.normalize, search=search,
                                        allow_empty=mode == "search_empty")
                elif keep is None:
                    budget = CostTarget(metric, value, allocation="uniform" if mode == "uniform" else "curves",
                                        normalize=args.normalize, reallocate=args.reallocate and mode == "curves",
                                        allow_empty=mode == "empty")
                else:
                    budget = PerLayerKeep(keep)
                report = prune(model, subject.calibration, budget, backend=backend, batch_size=subject.batch_size,
                               progress=False)
                seconds = time.perf_counter() - start
                if keep is None:
                    allocation = report.settings["allocation"]
                    keep, curve_seconds = allocation["keep"], allocation["seconds"]
                    search_record = allocation.get("search")
                    if search_record is not None:
                        search_record = {key: value for key, value in search_record.items() if key != "trace"} | {
                            "trace": [[t["evaluation"], t["seconds"], t["score"], t["best"]]
                                      for t in search_record["trace"]],
                            "changed": sum(search_record["keep"][n] != k
                                           for n, k in search_record["start_keep"].items())}
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
                    "search": search_record if mode in ("search", "search_empty") else None,
                    "emptied": sorted(name for name, count in keep.items() if count == 0),
                    "stock_loadable": report.settings.get("config_describes_pruned_model"),
                }
                rows.append(row)
                save()
                unseen = f" unseen mean {row['unseen_mean']:.4f}" if "unseen_mean" in row else ""
                print(f"  {target_text:12s} {mode:8s} {backend:13s} {subject.quality} "
                      f"{row[subject.quality]:.4f}{unseen} "
                      f"MACs {row['macs_fraction']:.3f} params {row['params_fraction']:.3f} "
                      f"speed-up {row['speedup']:.2f} ({seconds:.0f} s)"
                      + (f"; {len(row['emptied'])} sublayers removed" if row["emptied"] else ""), flush=True)
                if row["search"] is not None and backend == args.backends[0]:
                    record = row["search"]
                    print(f"    search: {record['metric']} {record['start_score']:.5f} -> {record['score']:.5f} "
                          f"({record['changed']} structures changed, {record['evaluations']:.0f} evaluations, "
                          f"{record['seconds']:.0f} s; pruned model {record['pruned_score']:.5f})", flush=True)
                del model


def table(rows: list[dict[str, Any]]) -> str:
    header = ("| model | target | budget | backend | quality | unseen mean | MACs | params | latency ms (range) | "
              "speed-up | predicted | achieved | prune s | search: start -> searched (pruned) | stock reload |")
    lines = [header, "|" + "---|" * 15]
    for row in rows:
        quality = row.get("perplexity", row.get("cosine_to_dense", row.get("accuracy")))
        unseen = "-" if row.get("unseen_mean") is None else f"{row['unseen_mean']:.4f}"
        if row["method"] == "dense":
            lines.append(f"| {row['model']} | dense | - | - | {quality:.4f} | {unseen} | 1 | 1 | "
                         f"{row['latency_ms']:.1f} ({row['latency_min_ms']:.1f}-{row['latency_max_ms']:.1f}) | 1 | - "
                         "| - | - | - | - |")
            continue
        search = row.get("search")
        searched = "-" if not search else (f"{search['start_score']:.4f} -> {search['score']:.4f} "
                                           f"({search['pruned_score']:.4f}), {search['seconds']:.0f} s")
        lines.append(
            f"| {row['model']} | {row['target']} | {row['mode']}"
            f"{f' ({len(emptied)} removed)' if (emptied := row.get('emptied')) else ''} | {row['method']} | "
            f"{quality:.4f} | {unseen} | {row['macs_fraction']:.3f} | {row['params_fraction']:.3f} | "
            f"{row['latency_ms']:.1f} "
            f"({row['latency_min_ms']:.1f}-{row['latency_max_ms']:.1f}) | {row['speedup']:.2f} | "
            f"{row['predicted_fraction']:.3f} | "
            f"{'-' if row.get('achieved_fraction') is None else format(row['achieved_fraction'], '.3f')} | "
            f"{row['prune_seconds']:.0f} | {searched} | {_yes_no(row.get('stock_loadable'))} |"
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
            axis.plot([p[0] for p in points], [p[1] for p in points], "--" if label[0] == "uniform" else "-",
                      marker="o", label=f"{label[1]} {MODE_LABELS.get(label[0], label[0])}")
        axis.set_title(f"{name}: dense {key} {dense[key]:.3f}")
        axis.set_xlabel("dense MACs / pruned MACs")
        axis.set_ylabel(key)
        if key == "perplexity":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def ensure_fashion_mnist() -> None:
    """Fashion-MNIST from Debian's package: installed with apt when missing and this runs as root,
    else a clear refusal (before any model is trained)."""
    import shutil
    import subprocess

    from osscar_opt.data import fashion

    try:
        fashion.folder()
        return
    except FileNotFoundError as missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise SystemExit(str(missing)) from None
    print("installing Debian's dataset-fashion-mnist with apt-get ...", flush=True)
    subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"], check=True, stdout=subprocess.DEVNULL)
    fashion.folder()


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
    parser.add_argument("--fashion-epochs", type=int, default=4,
                        help="*_fashion models: training epochs of the reference (10,000 training images)")
    parser.add_argument("--search-evaluations", type=int, default=64, help="mode search: candidate scores")
    parser.add_argument("--search-samples", type=int, default=16,
                        help="mode search: held-out samples (every 10th calibration article; images after the "
                        "calibration images)")
    parser.add_argument("--search-method", default="moves", choices=SEARCH_METHODS)
    parser.add_argument("--out", default="budgets", help="result file stem under benchmarks/results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    path = RESULTS / f"{args.out}.json"

    def save() -> None:
        path.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))

    if any(name.endswith("_fashion") for name in args.models):
        ensure_fashion_mnist()
    for name in args.models:
        run_subject(Subject(name, args), args, rows, save)
    print(table(rows))
    plot(rows, RESULTS / f"{args.out}.png")
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
