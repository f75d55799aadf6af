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
    parser.add_argument("--eval-text", nargs="+", default=None, metavar="TEXT",
                        help="evaluation texts: files or wiki, shakespeare, stdlib, licences (default: wiki, "
                        "its held-out articles); several give a row per text")
    parser.add_argument("--calibrated-on", default=None, metavar="TEXT",
                        help="the text the model was calibrated on (its row is marked and left out of the mean "
                        "of unseen texts; default: read from the saved folder's report, else wiki)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per evaluation window (default 128)")
    add_runtime_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_engine_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from osscar_opt import cross_domain, evaluate, models

    if args.engine is not None:
        return engine_eval.run(args)
    seq_len = positive_int(args.seq_len, "seq_len")
    specs = args.eval_text or [None]
    loaded = models.load_model(args.model, args.device, args.dtype)
    domains = cross_domain.domain_data(loaded.tokenizer, cross_domain.domain_texts(specs, loaded.causal),
                                       loaded.causal, seq_len=seq_len)
    first = next(iter(domains))
    reference, reference_domains = None, None
    if args.reference is not None:
        dense = models.load_model(args.reference, args.device, args.dtype)
        if dense.causal != loaded.causal:
            raise ValueError("reference: must be the same kind of model (causal LM or encoder) as MODEL")
        reference = evaluate.evaluate_model(dense.model, dense.tokenizer, domains[first])
        reference_domains = {first: reference, **cross_domain.quality(
            dense.model, dense.tokenizer, _without(domains, first))}
    result = evaluate.evaluate_model(loaded.model, loaded.tokenizer, domains[first], reference=reference)
    result_domains = {first: result, **cross_domain.quality(loaded.model, loaded.tokenizer, _without(domains, first),
                                                            reference=reference_domains)}
    calibrated_on = args.calibrated_on or _calibration_source(args.model)
    document: dict[str, Any] = {"model": loaded.name, "result": evaluate.public(result),
                                "domains": {k: evaluate.public(v) for k, v in result_domains.items()},
                                "calibrated_on": calibrated_on,
                                "unseen_mean": cross_domain.unseen_mean(result_domains, calibrated_on)}
    if reference is not None:
        document["reference"] = evaluate.public(reference)
        document["reference_domains"] = {k: evaluate.public(v) for k, v in reference_domains.items()}
    if args.json:
        print(json.dumps(document, indent=1))
        return 0
    if loaded.note:
        print(f"note: {loaded.note}")
    if reference is not None:
        print(evaluate.format_table(reference, result))
        if len(domains) > 1:
            print(f"\nquality per text (calibrated on {calibrated_on}):")
            print(cross_domain.format_table(reference_domains, result_domains, calibrated_on))
        return 0
    for key, label, fmt in evaluate.METRICS:
        if key in result and key != "cosine_to_dense":
            print(f"{label}: {fmt.format(result[key])}" + (f" ({first})" if key in QUALITY else ""))
    for key, other in _without(result_domains, first).items():
        for metric in QUALITY:
            if metric in other:
                print(f"{_label(metric)}: {other[metric]:.4f} ({key})")
    return 0


QUALITY = ("perplexity", "retrieval_top1")


def _label(metric: str) -> str:
    from osscar_opt import evaluate

    return next(label for key, label, _ in evaluate.METRICS if key == metric)


def _without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


def _calibration_source(model: str | None) -> str:
    """The calibration text a saved folder's report names, else the default source."""
    from pathlib import Path

    from osscar_opt.data import text

    if model is not None:
        report = Path(model) / "osscar_pruned.json"
        try:
            named = json.loads(report.read_text(encoding="utf-8")).get("calibration_text")
        except (OSError, ValueError, AttributeError):
            named = None
        if isinstance(named, str) and named:
            return named
    return text.source_name(None)
