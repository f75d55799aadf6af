"""How calibration size changes the ranking of backends and peers (quality after pruning).

Prunes a model with each backend (and, for the causal LM, each outside peer) at each calibration
size (samples x tokens per sample), same budgets and evaluation, and reports the quality (held-out
perplexity for SmolLM2, embedding cosine to dense for MiniLM), the mean relative layer loss
in-sample and, under ``--damp auto``, on the held-out calibration samples. SmolLM2's weights were
4-bit quantized (GGUF Q4_1) upstream and are dequantized on load. Writes JSON and a PNG.

    python benchmarks/calibration_size.py                                   # SmolLM2, 64 / 256 samples
    python benchmarks/calibration_size.py --model minilm --samples 64 256 1024 --heads-sparsity 0.5 \\
        --neurons-sparsity 0.5 --backends local-search activation fluctuation
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

from osscar_opt import evaluate
from osscar_opt.data import text
from osscar_opt.models import SMOLLM2_NOTE, load_model
from osscar_opt.pipeline import prune

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2")
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128])
    parser.add_argument("--backends", nargs="+", default=["local-search", "activation"])
    parser.add_argument("--peers", nargs="*", default=[], choices=["torch-pruning"])
    parser.add_argument("--heads-sparsity", type=float, default=0.0)
    parser.add_argument("--neurons-sparsity", type=float, default=0.25)
    parser.add_argument("--target", default="pruned-input", choices=["pruned-input", "dense-output"])
    parser.add_argument("--damp", default="auto", type=lambda t: t if t == "auto" else float(t))
    parser.add_argument("--perplexity-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default results/calibration_size_MODEL.json)")
    return parser.parse_args()


def quality(result: dict[str, Any], causal: bool) -> float:
    return result["perplexity"] if causal else result["cosine_to_dense"]


def plot(rows: list[dict[str, Any]], causal: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        for seq_len in dict.fromkeys(r["seq_len"] for r in rows):
            points = sorted((r["tokens"], r["quality"]) for r in rows
                            if r["method"] == method and r["seq_len"] == seq_len)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                      label=f"{method} ({seq_len} tok/sample)")
    axis.set_xscale("log")
    if causal:
        axis.set_yscale("log")
    axis.set_xlabel("calibration tokens")
    axis.set_ylabel("held-out perplexity" if causal else "embedding cosine to dense")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def run_method(method: str, loaded, calibration, budgets, args) -> tuple[Any, dict[str, Any]]:
    """Prune a copy of the model with ``method``; returns it and what to record."""
    model = copy.deepcopy(loaded.model)
    if method == "torch-pruning":
        from osscar_opt.peers.torch_pruning import prune_with_torch_pruning

        start = time.perf_counter()
        prune_with_torch_pruning(model, calibration, kv_sparsity=budgets["kv_groups"],
                                 neuron_sparsity=budgets["neurons"], importance="taylor")
        return model, {"prune_seconds": time.perf_counter() - start}
    report = prune(model, calibration, budgets, backend=method, target=args.target, damp=args.damp, progress=False)
    losses = [layer.relative_loss for layer in report.layers]
    heldout = [layer.heldout_relative_loss for layer in report.layers]
    return model, {
        "prune_seconds": report.seconds, "mean_relative_layer_loss": sum(losses) / len(losses),
        "mean_heldout_relative_layer_loss": None if None in heldout else sum(heldout) / len(heldout),
    }


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out or RESULTS / f"calibration_size_{args.model}.json"
    loaded = load_model(None if args.model == "minilm" else "smollm2", device="cpu")
    causal = loaded.causal
    texts = text.load_texts(None, "calib", causal)
    eval_data = evaluate.make_eval_data(loaded.tokenizer, text.load_texts(None, "eval", causal), causal,
                                        seq_len=128, max_windows=args.perplexity_windows)
    dense = evaluate.evaluate_model(loaded.model, loaded.tokenizer, eval_data)
    budgets = {"heads": args.heads_sparsity, "kv_groups": args.heads_sparsity, "neurons": args.neurons_sparsity}
    methods = list(args.backends) + (list(args.peers) if causal else [])
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seq_len in args.seq_lens:
        for samples in args.samples:
            calibration = text.calibration_ids(loaded.tokenizer, texts, samples, seq_len)
            for method in methods:
                model, record = run_method(method, loaded, calibration, budgets, args)
                result = evaluate.evaluate_model(model, loaded.tokenizer, eval_data, reference=dense)
                rows.append({"samples": samples, "seq_len": seq_len, "tokens": samples * seq_len, "method": method,
                             "quality": quality(result, causal), **record})
                heldout = rows[-1].get("mean_heldout_relative_layer_loss")
                print(f"{samples:5d} x {seq_len} tokens  {method:13s} {'perplexity' if causal else 'cosine'} "
                      f"{rows[-1]['quality']:.4f}  layer loss {rows[-1].get('mean_relative_layer_loss') or 0:.4f}"
                      f"{'' if heldout is None else f' / held-out {heldout:.4f}'}  ({record['prune_seconds']:.0f} s)",
                      flush=True)
                del model
    metric = "perplexity" if causal else "cosine to dense"
    print(f"\n{loaded.name}: dense {metric} {quality(dense, causal):.4f}; heads {args.heads_sparsity}, neurons "
          f"{args.neurons_sparsity}; target {args.target}, damp {args.damp}; "
          f"total {time.perf_counter() - started:.0f} s\n")
    print("| calibration | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for seq_len in args.seq_lens:
        for samples in args.samples:
            cells = [f"{r['quality']:.4f}" for m in methods for r in rows
                     if r["samples"] == samples and r["seq_len"] == seq_len and r["method"] == m]
            print(f"| {samples} x {seq_len} tokens | " + " | ".join(cells) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"note": SMOLLM2_NOTE if causal else "", "dense_quality": quality(dense, causal), "metric": metric,
                "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    out.write_text(json.dumps(document, indent=1))
    plot(rows, causal, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
