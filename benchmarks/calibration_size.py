"""How calibration size changes the ranking of backends on SmolLM2 (perplexity after pruning).

Prunes SmolLM2-135M with each backend at each calibration size (samples of ``--seq-len`` tokens)
and reports held-out perplexity and the mean relative layer loss (in-sample, on the calibration
set). Weights were 4-bit quantized (GGUF Q4_1) upstream and are dequantized on load.

    python benchmarks/calibration_size.py                       # 64 and 256 samples, neurons 25%
    python benchmarks/calibration_size.py --samples 32 128 --neurons-sparsity 0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any

from osscar_opt import evaluate
from osscar_opt.data import text
from osscar_opt.models import SMOLLM2_NOTE, load_model
from osscar_opt.pipeline import prune

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--backends", nargs="+", default=["local-search", "activation"])
    parser.add_argument("--heads-sparsity", type=float, default=0.0)
    parser.add_argument("--neurons-sparsity", type=float, default=0.25)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--perplexity-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration_size.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loaded = load_model("smollm2", device="cpu")
    texts = text.load_texts(None, "calib", True)
    eval_data = evaluate.make_eval_data(loaded.tokenizer, text.load_texts(None, "eval", True), True,
                                        seq_len=args.seq_len, max_windows=args.perplexity_windows)
    dense = evaluate.evaluate_model(loaded.model, loaded.tokenizer, eval_data)
    rows: list[dict[str, Any]] = []
    for samples in args.samples:
        calibration = text.calibration_ids(loaded.tokenizer, texts, samples, args.seq_len)
        for backend in args.backends:
            model = copy.deepcopy(loaded.model)
            budgets = {"heads": args.heads_sparsity, "kv_groups": args.heads_sparsity, "neurons": args.neurons_sparsity}
            report = prune(model, calibration, budgets, backend=backend, progress=False)
            result = evaluate.evaluate_model(model, loaded.tokenizer, eval_data, reference=dense)
            losses = [layer.relative_loss for layer in report.layers]
            rows.append({"samples": samples, "tokens": samples * args.seq_len, "backend": backend,
                         "perplexity": result["perplexity"], "mean_relative_layer_loss": sum(losses) / len(losses),
                         "prune_seconds": report.seconds})
            print(f"{samples:5d} samples  {backend:13s} perplexity {result['perplexity']:.2f}  mean relative layer "
                  f"loss {rows[-1]['mean_relative_layer_loss']:.4f}  ({report.seconds:.0f} s)", flush=True)
            del model
    print(f"\ndense perplexity {dense['perplexity']:.2f}; heads {args.heads_sparsity}, neurons "
          f"{args.neurons_sparsity}\n")
    print("| calibration | " + " | ".join(args.backends) + " |")
    print("|---|" + "---|" * len(args.backends))
    for samples in args.samples:
        cells = [f"{r['perplexity']:.2f}" for b in args.backends for r in rows if r["samples"] == samples
                 and r["backend"] == b]
        print(f"| {samples} x {args.seq_len} tokens | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {"note": SMOLLM2_NOTE, "dense_perplexity": dense["perplexity"], "settings": {
        k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.write_text(json.dumps(document, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
