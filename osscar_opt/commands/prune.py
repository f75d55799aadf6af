"""``osscar prune``: prune a transformer (default all-MiniLM-L6-v2) or a torchvision network."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from osscar_opt.commands.options import (
    add_backend_arguments,
    add_runtime_arguments,
    parse_backend_options,
    positive_int,
)

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 8


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune", help="prune attention heads / MLP neurons (or conv channels) of a model",
        description="Prune a model one block at a time and print a before/after table. Without --model it prunes "
        "all-MiniLM-L6-v2 on English prose from the Python standard library's docstrings.",
    )
    parser.add_argument("--model", default=None,
                        help="all-minilm-l6-v2 (default), smollm2, a local Hugging Face folder, a .gguf file, "
                        "or a torchvision architecture name")
    parser.add_argument("--heads-sparsity", type=float, default=0.25,
                        help="fraction of attention heads (KV groups for GQA) removed per block (default 0.25)")
    parser.add_argument("--neurons-sparsity", type=float, default=0.25,
                        help="fraction of MLP neurons removed per block (default 0.25)")
    parser.add_argument("--channels-sparsity", type=float, default=None,
                        help="fraction of conv channels removed (torchvision models only)")
    parser.add_argument("--weights", default=None, help="torchvision weights file (torchvision models only)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="calibration image side in pixels (torchvision models only)")
    parser.add_argument("--calibration-images", default=None,
                        help="safetensors file with an 'images' tensor (N, 3, H, W) (torchvision models only)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="digits training epochs when no --weights are given (torchvision models only)")
    add_backend_arguments(parser)
    parser.add_argument("--refit-bias", action="store_true", help="re-fit the bias of layers that have one")
    parser.add_argument("--damp", type=float, default=1e-2, help="ridge weight relative to mean diag(X^T X)")
    parser.add_argument("--samples", type=int, default=None, help=f"calibration samples (default {DEFAULT_SAMPLES})")
    parser.add_argument("--seq-len", type=int, default=None, help=f"tokens per sample (default {DEFAULT_SEQ_LEN})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"samples per forward pass (default {DEFAULT_BATCH_SIZE})")
    add_runtime_arguments(parser)
    parser.add_argument("--calib-text", default=None, help="calibration text file (or dataset name when online)")
    parser.add_argument("--eval-text", default=None, help="evaluation text file (or dataset name when online)")
    parser.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    parser.add_argument("--output", default=None, help="folder to save the pruned model to")
    parser.add_argument("--report", default=None, help="write the JSON report (per-layer loss and time) here")
    parser.add_argument("--save-problems", default=None, help="write every layer problem to this folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _vision_architectures() -> tuple[str, ...]:
    try:
        from osscar_opt import vision
    except ModuleNotFoundError as exc:
        if exc.name == "osscar_opt.vision":
            return ()
        raise
    return tuple(vision.SUPPORTED)


def _check_arguments(args: argparse.Namespace) -> None:
    from osscar_opt.driver import check_sparsity

    check_sparsity(args.heads_sparsity, "heads_sparsity")
    check_sparsity(args.neurons_sparsity, "neurons_sparsity")
    for name in ("samples", "seq_len", "batch_size"):
        if getattr(args, name) is not None:
            positive_int(getattr(args, name), name)
    from osscar_opt import backends

    backends.get(args.backend)  # an unknown backend fails before any model is loaded
    if args.channels_sparsity is not None or args.weights is not None:
        raise ValueError("channels_sparsity: --channels-sparsity and --weights apply to torchvision models only")


def prune_transformer(args: argparse.Namespace) -> dict[str, Any]:
    """Load, evaluate, prune, evaluate again, save; returns the report document."""
    from osscar_opt import data, evaluate, models
    from osscar_opt.driver import prune

    _check_arguments(args)
    loaded = models.load_model(args.model, args.device, args.dtype)
    seq_len = args.seq_len or DEFAULT_SEQ_LEN
    calibration = data.calibration_ids(
        loaded.tokenizer, data.load_texts(args.calib_text, "calib", loaded.causal, "calib_text"),
        args.samples or DEFAULT_SAMPLES, seq_len,
    )
    eval_data = None
    if not args.no_eval:
        texts = data.load_texts(args.eval_text, "eval", loaded.causal, "eval_text")
        eval_data = evaluate.make_eval_data(loaded.tokenizer, texts, loaded.causal, seq_len=seq_len)
        before = evaluate.evaluate_model(loaded.model, loaded.tokenizer, eval_data)
    report = prune(
        loaded.model, calibration, heads_sparsity=args.heads_sparsity, neurons_sparsity=args.neurons_sparsity,
        backend=args.backend, backend_options=parse_backend_options(args.backend_option),
        refit_bias=args.refit_bias, damp=args.damp, batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        save_problems=args.save_problems, progress=not args.quiet,
    )
    document: dict[str, Any] = {"model": loaded.name, "note": loaded.note, **report.to_dict()}
    if eval_data is not None:
        after = evaluate.evaluate_model(loaded.model, loaded.tokenizer, eval_data, reference=before)
        document["dense"], document["pruned"] = evaluate.public(before), evaluate.public(after)
        print(f"\n{loaded.name}: pruned in {report.seconds:.1f} s with {args.backend}")
        if loaded.note:
            print(f"note: {loaded.note}")
        print(evaluate.format_table(before, after))
    if args.output:
        from osscar_opt.io import save_pruned

        save_pruned(loaded.model, args.output, tokenizer=loaded.tokenizer)
        print(f"saved the pruned model to {args.output}")
    return document


def run(args: argparse.Namespace) -> int:
    if args.model is not None and args.model in _vision_architectures():
        from osscar_opt import vision

        return int(vision.run_prune(args) or 0)
    document = prune_transformer(args)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(document, indent=1))
        print(f"wrote the report to {args.report}")
    return 0
