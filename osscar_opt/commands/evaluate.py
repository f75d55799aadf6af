"""``osscar eval``: size, speed and quality of a model, optionally next to a reference model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from osscar_opt.commands import engine_eval
from osscar_opt.commands.engine_eval import add_engine_arguments
from osscar_opt.commands.options import add_runtime_arguments, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a (pruned) model: params, MACs, latency, perplexity or embedding quality",
        description="Evaluate MODEL (a saved pruned model folder, a Hugging Face folder, all-minilm-l6-v2 or "
        "smollm2). With --reference, print a table next to the reference (and the embedding cosine to it).",
    )
    parser.add_argument("model", nargs="?", default=None, help="model to evaluate (default all-minilm-l6-v2)")
    parser.add_argument("--reference", default=None, help="reference (dense) model to compare with")
    parser.add_argument("--eval-text", default=None, help="evaluation text file (default: built-in held-out text)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per evaluation window (default 128)")
    add_runtime_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_engine_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from osscar_opt import evaluate, models
    from osscar_opt.data import text

    if args.engine is not None:
        return engine_eval.run(args)
    seq_len = positive_int(args.seq_len, "seq_len")
    loaded = models.load_model(args.model, args.device, args.dtype)
    texts = text.load_texts(args.eval_text, "eval", loaded.causal, "eval_text")
    eval_data = evaluate.make_eval_data(loaded.tokenizer, texts, loaded.causal, seq_len=seq_len)
    reference = None
    if args.reference is not None:
        dense = models.load_model(args.reference, args.device, args.dtype)
        if dense.causal != loaded.causal:
            raise ValueError("reference: must be the same kind of model (causal LM or encoder) as MODEL")
        reference = evaluate.evaluate_model(dense.model, dense.tokenizer, eval_data)
    result = evaluate.evaluate_model(loaded.model, loaded.tokenizer, eval_data, reference=reference)
    document: dict[str, Any] = {"model": loaded.name, "result": evaluate.public(result)}
    if reference is not None:
        document["reference"] = evaluate.public(reference)
    if args.json:
        print(json.dumps(document, indent=1))
        return 0
    if loaded.note:
        print(f"note: {loaded.note}")
    if reference is not None:
        print(evaluate.format_table(reference, result))
    else:
        for key, label, fmt in evaluate.METRICS:
            if key in result and key != "cosine_to_dense":
                print(f"{label}: {fmt.format(result[key])}")
    return 0
