"""Quality on several kinds of text: the yardstick of a pruned model is text its calibration never saw.

A model pruned by reconstructing its layers' outputs on calibration text is fit to that text; its
perplexity (or embedding cosine) on held-out windows *of the same text* says little about the text a
user runs it on. So quality is measured per domain (:data:`osscar_opt.data.text.DOMAINS` or text
files), and the headline is the mean over the domains the calibration never saw.

Shapes and units: perplexity is per token (exp of the mean cross-entropy in nats); cosine and
retrieval are in [0, 1] over the domain's passages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from osscar_opt import evaluate
from osscar_opt.data import text

NGRAM = 8
"""Word n-grams compared to tell how much of an evaluation text is in the calibration text."""
OVERLAP_WARNING = 0.01
"""An evaluation text with more than this share of its n-grams in the calibration text gets a warning."""


def domain_texts(specs: Sequence[str | None], causal: bool, name: str = "eval_text") -> dict[str, list[str]]:
    """The evaluation part of every text source, keyed by its name; every source is read and checked
    before any model is run (an empty or non-text file is refused naming it; a name given twice too)."""
    if not specs:
        raise ValueError(f"{name}: expected at least one text (a file or one of {', '.join(text.DOMAINS)})")
    texts: dict[str, list[str]] = {}
    for spec in specs:
        key = text.source_name(spec)
        if key in texts:
            raise ValueError(f"{name}: {key!r} is given twice")
        texts[key] = text.load_texts(spec, "eval", causal, name)
    return texts


def domain_data(tokenizer, texts: dict[str, list[str]], causal: bool, *, seq_len: int = 128,
                name: str = "eval_text") -> dict[str, evaluate.EvalData]:
    """One :class:`~osscar_opt.evaluate.EvalData` per text of :func:`domain_texts`, keyed alike."""
    data: dict[str, evaluate.EvalData] = {}
    for key, passages in texts.items():
        try:
            data[key] = evaluate.make_eval_data(tokenizer, passages, causal, seq_len=seq_len)
        except ValueError as error:
            raise ValueError(f"{name}: {key}: {error}") from error
    return data


def quality(model: nn.Module, tokenizer, data: dict[str, evaluate.EvalData],
            reference: dict[str, dict[str, Any]] | None = None, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Per domain, the quality metrics of :func:`osscar_opt.evaluate.evaluate_model` (no size or speed);
    ``reference``: the dense model's result per domain (for the embedding cosine)."""
    return {key: evaluate.evaluate_model(model, tokenizer, item, None if reference is None else reference[key],
                                         speed=False, progress=progress)
            for key, item in data.items()}


def headline_metric(results: dict[str, dict[str, Any]]) -> str:
    """``perplexity`` for causal LMs, ``cosine_to_dense`` for encoders."""
    first = next(iter(results.values()))
    return "perplexity" if "perplexity" in first else "cosine_to_dense"


def unseen_mean(results: dict[str, dict[str, Any]], calibrated_on: str | None,
                metric: str | None = None) -> float | None:
    """Mean of ``metric`` over the domains other than ``calibrated_on`` (None when there is none)."""
    metric = metric or headline_metric(results)
    values = [r[metric] for key, r in results.items() if not same_source(key, calibrated_on) and metric in r]
    return sum(values) / len(values) if values else None


def same_source(key: str, calibrated_on: str | None) -> bool:
    """True when the domain ``key`` is one of the calibration's own sources (its held-out part);
    ``calibrated_on`` names one source or a mixture (``"wiki + stdlib"``, :func:`text.sources_name`)."""
    if calibrated_on is None:
        return False
    return key.split(" ")[0] in {part.split(" ")[0] for part in calibrated_on.split(" + ")}


def format_table(dense: dict[str, dict[str, Any]], pruned: dict[str, dict[str, Any]],
                 calibrated_on: str | None) -> str:
    """One row per domain (dense, pruned, ratio), the calibration's own domain marked, and the mean over
    the domains the calibration never saw."""
    metric = headline_metric(pruned)
    label = "perplexity" if metric == "perplexity" else "cosine to dense"
    rows = [f"{'text':<36}{'dense ' + label:>22}{'pruned':>12}{'ratio':>9}"]
    for key, result in pruned.items():
        before = dense[key].get(metric, float("nan")) if metric == "perplexity" else 1.0
        after = result[metric]
        mark = " (calibration's, held out)" if same_source(key, calibrated_on) else ""
        rows.append(f"{(key + mark)[:36]:<36}{before:>22.4f}{after:>12.4f}{after / before:>9.3f}")
    mean = unseen_mean(pruned, calibrated_on, metric)
    if mean is not None and len(pruned) > 1:
        dense_mean = unseen_mean(dense, calibrated_on, metric) if metric == "perplexity" else 1.0
        rows.append(f"{'mean of unseen texts':<36}{dense_mean:>22.4f}{mean:>12.4f}{mean / dense_mean:>9.3f}")
    return "\n".join(rows)


def _ngrams(texts: Sequence[str]) -> set[int]:
    grams: set[int] = set()
    for passage in texts:
        words = re.findall(r"\w+", passage.lower())
        grams.update(hash(tuple(words[i : i + NGRAM])) for i in range(len(words) - NGRAM + 1))
    return grams


def overlap_shares(calibration: Sequence[str], evaluations: dict[str, list[str]]) -> dict[str, float]:
    """Per evaluation text, the share of its word 8-grams that also occur in the calibration text,
    in [0, 1] (the calibration's n-grams are collected once)."""
    calibration_grams = _ngrams(calibration)
    shares = {}
    for key, passages in evaluations.items():
        seen = _ngrams(passages)
        shares[key] = len(seen & calibration_grams) / len(seen) if seen else 0.0
    return shares


def overlap_share(calibration: Sequence[str], evaluation: Sequence[str]) -> float:
    """Share of the evaluation text's word 8-grams that also occur in the calibration text, in [0, 1]."""
    return overlap_shares(calibration, {"evaluation": list(evaluation)})["evaluation"]
