"""End-to-end benchmark (issue 5): prune real models with every backend, one table.

* all-MiniLM-L6-v2 (the default model) at 25% and 50% of heads and neurons per block: mean
  embedding cosine to dense and retrieval top-1.
* SmolLM2-135M (LLaMA, GQA 9/3) at 10%, 25%, 50% of neurons and 1 of 3 KV groups per block:
  perplexity. Its weights were 4-bit quantized (GGUF Q4_1) upstream and dequantized on load.

Calibration: ``--calib-text`` (default: the CLI's, Wikipedia summaries). Quality is measured on
every text of ``--eval-texts`` (default: wiki's held-out articles, Shakespeare, Python docstrings,
Debian licence texts); the headline column is the mean over the texts the calibration never saw,
beside the calibration text's own held-out part. Every backend runs with the CLI's defaults
(``--targets`` / ``--damps`` widen the grid).

Every row also gives parameters, MACs (torch FLOP counter / 2), median forward latency on a fixed
batch and the pruning wall time. Writes ``benchmarks/results/end_to_end.json`` (updated after every
row) and ``end_to_end.png``; prints the table as Markdown.

    python benchmarks/end_to_end.py                 # full grid (2-core CPU: MiniLM 16 min, SmolLM2 over 1 h)
    python benchmarks/end_to_end.py --quick         # small smoke run
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from osscar_opt import cross_domain, evaluate
from osscar_opt.data import text
from osscar_opt.models import SMOLLM2_NOTE, load_model
from osscar_opt.pipeline import prune
from osscar_opt.pipeline.settings import DEFAULT_DAMP

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("local-search", "greedy", "activation", "fluctuation", "magnitude")
TARGETS = ("pruned-input", "dense-output")
PEERS = ("torch-pruning",)


def damp_arg(text: str) -> float | str:
    return text if text == "auto" else float(text)


def run_peer(peer: str, model, calibration, heads: float, neurons: float) -> dict[str, Any]:
    """An outside method on ``model`` in place (LLaMA family only): its report."""
    if peer == "torch-pruning":
        from osscar_opt.peers.torch_pruning import prune_with_torch_pruning

        return prune_with_torch_pruning(model, calibration, kv_sparsity=heads, neuron_sparsity=neurons,
                                        importance="taylor")
    raise ValueError(f"peers: unknown peer {peer!r}; known: {list(PEERS)}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--targets", nargs="+", default=["pruned-input"], choices=TARGETS)
    parser.add_argument("--damps", nargs="+", type=damp_arg, default=[DEFAULT_DAMP],
                        help="ridge settings to run every backend with (numbers or 'auto')")
    parser.add_argument("--objectives", nargs="+", default=["energy"], choices=["energy", "token"])
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS,
                        help="outside methods run on the causal LM (same calibration, budgets, evaluation)")
    parser.add_argument("--settings", nargs="+", type=int, default=None,
                        help="indices of the model's budget settings to run (default: all)")
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--minilm-samples", type=int, default=128)
    parser.add_argument("--smollm2-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-text", default=None, help="calibration text (default: the CLI's, wiki)")
    parser.add_argument("--eval-texts", nargs="+", default=["wiki", "shakespeare", "stdlib", "licences"],
                        help="texts quality is measured on (the first also gives size and latency)")
    parser.add_argument("--perplexity-windows", type=int, default=16)
    parser.add_argument("--smollm2-local-search", default="{}",
                        help="JSON options of local-search on SmolLM2 (default: the backend's defaults)")
    parser.add_argument("--minilm-local-search", default="{}",
                        help="JSON options of local-search on MiniLM (default: the backend's defaults)")
    parser.add_argument("--quick", action="store_true", help="tiny sample counts, two backends")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table-from", type=Path, nargs="+", default=None,
                        help="print the table of saved JSON files (e.g. one per model) and write their rows, "
                             "combined, as end_to_end.json and end_to_end.png under --out")
    return parser.parse_args()


def settings(model: str) -> list[tuple[str, float, float]]:
    """``(label, heads_sparsity, neurons_sparsity)`` rows for ``model``."""
    if model == "minilm":
        return [("heads 25% + neurons 25%", 0.25, 0.25), ("heads 50% + neurons 50%", 0.5, 0.5)]
    return [(f"KV groups 1/3 + neurons {int(s * 100)}%", 1 / 3, s) for s in (0.1, 0.25, 0.5)]


def run_model(name: str, args: argparse.Namespace, rows: list[dict[str, Any]], save) -> None:
    spec = None if name == "minilm" else "smollm2"
    loaded = load_model(spec, device="cpu")
    samples = args.minilm_samples if name == "minilm" else args.smollm2_samples
    calibration = text.calibration_ids(loaded.tokenizer, text.load_texts(args.calib_text, "calib", loaded.causal),
                                       samples, args.seq_len)
    calibrated_on = text.source_name(args.calib_text)
    domains = cross_domain.domain_data(loaded.tokenizer, cross_domain.domain_texts(args.eval_texts, loaded.causal),
                                       loaded.causal, seq_len=args.seq_len)
    for item in domains.values():
        item.max_windows = args.perplexity_windows
    first = next(iter(domains))

    def measure(model, reference=None) -> dict[str, Any]:
        """The first text's full evaluation, with ``domains`` (every text's quality) and ``unseen_mean``."""
        result = evaluate.evaluate_model(model, loaded.tokenizer, domains[first],
                                         reference=None if reference is None else reference)
        rest = {k: v for k, v in domains.items() if k != first}
        per_text = {first: result, **cross_domain.quality(model, loaded.tokenizer, rest,
                                                          None if reference is None else reference["_domains"])}
        result["_domains"] = per_text
        metric = cross_domain.headline_metric(per_text)
        result["domains"] = {k: v[metric] for k, v in per_text.items()}
        result["unseen_mean"] = cross_domain.unseen_mean(per_text, calibrated_on)
        result["calibrated_on"] = calibrated_on
        return result

    dense = measure(loaded.model)
    rows.append(row(loaded.name, "dense", "-", dense, 0.0))
    save()
    chosen = settings(name) if args.settings is None else [settings(name)[i] for i in args.settings]
    for label, heads, neurons in chosen:
        budgets = {"heads": heads, "kv_groups": heads, "neurons": neurons}
        for backend in args.backends:
            for target, damp, objective in itertools.product(args.targets, args.damps, args.objectives):
                own = args.smollm2_local_search if loaded.causal else args.minilm_local_search
                options = json.loads(own) if backend == "local-search" else {}
                model = copy.deepcopy(loaded.model)
                report = prune(model, calibration, budgets, backend=backend, backend_options=options,
                               target=target, damp=damp, objective=objective, batch_size=8, progress=False)
                result = measure(model, reference=dense)
                rows.append(row(loaded.name, label, backend, result, report.seconds, neurons=neurons,
                                options=options, target=target, damp=damp, layers=report.layers))
                rows[-1]["objective"] = objective
                save()
                print(format_row(rows[-1]), flush=True)
                del model
        for peer in args.peers if loaded.causal else []:
            model = copy.deepcopy(loaded.model)
            started = time.perf_counter()
            info = run_peer(peer, model, calibration, heads, neurons)
            seconds = time.perf_counter() - started
            result = measure(model, reference=dense)
            rows.append(row(loaded.name, label, peer, result, seconds, neurons=neurons,
                            options={"importance": info.get("importance")}, target="-", damp="-"))
            save()
            print(format_row(rows[-1]), flush=True)
            del model


def row(model: str, setting: str, backend: str, result: dict[str, Any], seconds: float, neurons: float = 0.0,
        options: dict[str, Any] | None = None, target: str = "-", damp: Any = "-", layers=None) -> dict[str, Any]:
    """One table row; ``layers`` (pipeline records) add the mean in-sample and held-out relative losses."""
    in_sample = heldout = None
    if layers:
        in_sample = sum(r.relative_loss for r in layers) / len(layers)
        if all(r.heldout_relative_loss is not None for r in layers):
            heldout = sum(r.heldout_relative_loss for r in layers) / len(layers)
    return {"model": model, "setting": setting, "backend": backend, "target": target, "damp": damp,
            "neurons_sparsity": neurons, "backend_options": options or {}, "prune_seconds": seconds,
            "mean_relative_loss": in_sample, "mean_heldout_relative_loss": heldout,
            **{k: v for k, v in evaluate.public(result).items() if not k.startswith("_")}}


HEADER = ("model", "setting", "backend", "target", "damp", "calibration's text (held out)", "unseen texts (mean)",
          "retrieval@1", "layer loss (in / held-out)", "params (M)", "GMACs", "latency (ms)", "prune time (s)")


def format_row(r: dict[str, Any]) -> str:
    def fmt(key: str, pattern: str) -> str:
        return pattern.format(r[key]) if r.get(key) is not None else "-"

    losses = "-" if r.get("mean_relative_loss") is None else f"{r['mean_relative_loss']:.4f}"
    if r.get("mean_heldout_relative_loss") is not None:
        losses += f" / {r['mean_heldout_relative_loss']:.4f}"
    cells = (r["model"], r["setting"], r["backend"] + ("*" if r.get("backend_options") else ""),
             str(r.get("target", "-")) + ("" if r.get("objective", "energy") == "energy" else f" ({r['objective']})"),
             str(r.get("damp", "-")),
             _in_domain(r), fmt("unseen_mean", "{:.4f}" if r.get("cosine_to_dense") is not None else "{:.2f}"),
             fmt("retrieval_top1", "{:.3f}"), losses,
             f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.2f}", f"{r['latency_ms']:.0f}",
             f"{r['prune_seconds']:.0f}" if r["backend"] != "-" else "-")
    return "| " + " | ".join(cells) + " |"


def _in_domain(r: dict[str, Any]) -> str:
    """The calibration text's held-out quality (cosine or perplexity), '-' when it was not measured."""
    domains, source = r.get("domains") or {}, str(r.get("calibrated_on", "")).split(" ")[0]
    value = domains.get(source)
    return "-" if value is None else (f"{value:.2f}" if r.get("perplexity") is not None else f"{value:.4f}")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + [format_row(r) for r in rows])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, model, label in ((axes[0], "unseen_mean", "all-minilm-l6-v2",
                                     "embedding cosine to dense, mean of unseen texts"),
                                    (axes[1], "unseen_mean", "smollm2", "perplexity, mean of unseen texts")):
        pruned = [r for r in rows if r["model"] == model and r["backend"] != "-"]
        def label_of(r: dict[str, Any]) -> str:
            if r.get("target", "-") == "-":
                return r["backend"]
            objective = "" if r.get("objective", "energy") == "energy" else f" {r['objective']}"
            return f"{r['backend']} {r['target']} {r['damp']}{objective}"

        backends = list(dict.fromkeys(r["backend"] for r in rows if r["backend"] != "-"))
        colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
        for label_ in dict.fromkeys(label_of(r) for r in pruned):
            chosen = [r for r in pruned if label_of(r) == label_]
            points = sorted((r["neurons_sparsity"], r[key]) for r in chosen)
            first = chosen[0]
            style = ":" if first.get("objective", "energy") != "energy" else (
                "--" if first.get("target") == "dense-output" else "-")
            marker = "s" if str(first.get("damp")) == "auto" else "o"
            axis.plot([p[0] for p in points], [p[1] for p in points], style, marker=marker,
                      color=colors[first["backend"]], label=label_)
        dense = [r for r in rows if r["model"] == model and r["backend"] == "-"]
        if dense and model == "smollm2":
            axis.axhline(dense[0][key], color="gray", linestyle="--", label="dense")
            axis.set_yscale("log")
        axis.set_xlabel("neuron sparsity per block" + (" (+ 1/3 KV groups)" if model == "smollm2" else
                                                        " (= head sparsity)"))
        axis.set_ylabel(label)
        axis.set_title(model + (" (4-bit GGUF weights)" if model == "smollm2" else ""))
        axis.legend(fontsize=6, ncol=2)
    figure.suptitle("colour: backend; solid: pruned-input, dashed: dense-output, dotted: token objective; "
                    "square: damp auto", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def combine(paths: list[Path], out: Path) -> None:
    """Print the rows of saved runs as one table; write them as one JSON and plot under ``out``."""
    documents = [json.loads(path.read_text()) for path in paths]
    rows = [r for document in documents for r in document["rows"]]
    print(markdown(rows))
    if len(paths) > 1:
        out.mkdir(parents=True, exist_ok=True)
        runs = [{"source": str(path), "seconds": d.get("seconds"), "settings": d.get("settings")}
                for path, d in zip(paths, documents, strict=True)]
        (out / "end_to_end.json").write_text(json.dumps({"note": SMOLLM2_NOTE, "runs": runs, "rows": rows}, indent=1))
        plot(rows, out / "end_to_end.png")
        print(f"wrote {out / 'end_to_end.json'} and end_to_end.png")


def main() -> None:
    args = parse_args()
    if args.table_from is not None:
        combine(args.table_from, args.out)
        return
    if args.quick:
        args.minilm_samples, args.smollm2_samples, args.perplexity_windows = 8, 4, 4
        args.backends = ["local-search", "magnitude"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def save() -> None:
        document = {"note": SMOLLM2_NOTE, "seconds": time.perf_counter() - started, "settings": {
            k: str(v) for k, v in vars(args).items()}, "rows": rows}
        (args.out / "end_to_end.json").write_text(json.dumps(document, indent=1))

    for name in args.models:
        run_model(name, args, rows, save)
    plot(rows, args.out / "end_to_end.png")
    print(f"\n{markdown(rows)}\n")
    print(f"* local-search ran with {args.smollm2_local_search} on SmolLM2, {args.minilm_local_search} on MiniLM. "
          f"{SMOLLM2_NOTE}.")
    print(f"total {time.perf_counter() - started:.0f} s; wrote {args.out / 'end_to_end.json'} and end_to_end.png")


if __name__ == "__main__":
    main()
