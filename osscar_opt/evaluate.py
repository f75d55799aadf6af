"""Evaluation: perplexity (causal LMs), embedding cosine and retrieval (encoders), size and speed.

* perplexity: ``exp`` of the mean next-token negative log-likelihood over non-overlapping windows.
* embeddings: mean pooling of the last hidden state over real tokens (as sentence-transformers
  does for all-MiniLM-L6-v2); ``cosine_to_dense`` is the mean cosine between pruned and dense
  embeddings of the same passages.
* retrieval top-1: each passage's first half must retrieve its own second half among all second
  halves (cosine of embeddings); label-free.
* MACs: torch's FLOP counter on a fixed batch, divided by two (one multiply-add = 2 FLOPs).
* latency: median wall time of a forward pass on that batch, in milliseconds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class EvalData:
    """What a model is evaluated on: passages (encoders) or a token stream (causal LMs)."""

    causal: bool
    passages: list[str] = field(default_factory=list)
    stream: torch.Tensor | None = None
    seq_len: int = 128
    batch: dict[str, torch.Tensor] = field(default_factory=dict)
    max_windows: int = 32


def make_eval_data(tokenizer, texts: list[str], causal: bool, *, seq_len: int = 128, max_passages: int = 256,
                   max_windows: int = 32, latency_batch: int = 4) -> EvalData:
    """Prepare evaluation passages / tokens and the fixed batch used for MACs and latency.

    Perplexity uses at most ``max_windows`` windows of ``seq_len`` tokens; the embedding scores at
    most ``max_passages`` passages; MACs and latency a fixed ``(latency_batch, seq_len)`` batch.
    """
    from osscar_opt.data.text import calibration_ids, token_stream

    if isinstance(seq_len, bool) or int(seq_len) < 1:
        raise ValueError(f"seq_len: expected a positive integer, got {seq_len!r}")
    ids = calibration_ids(tokenizer, texts, latency_batch, seq_len, seed=1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if causal:
        stream = token_stream(tokenizer, texts)
        return EvalData(True, stream=stream, seq_len=seq_len, batch=batch, max_windows=max_windows)
    passages = [p for p in texts if len(p.split()) >= 8][:max_passages]
    if len(passages) < 2:
        raise ValueError("eval_text: need at least two passages of 8+ words for the embedding evaluation")
    return EvalData(False, passages=passages, seq_len=seq_len, batch=batch)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def perplexity(model: nn.Module, stream: torch.Tensor, seq_len: int = 128, batch_size: int = 4,
               max_windows: int | None = 64) -> float:
    """Perplexity of a causal LM on non-overlapping ``seq_len`` windows of ``stream`` (1-D ids)."""
    count = stream.numel() // seq_len
    if count == 0:
        raise ValueError(f"eval_text: {stream.numel()} tokens, fewer than seq_len={seq_len}")
    if max_windows is not None:
        count = min(count, max_windows)
    windows = stream[: count * seq_len].view(count, seq_len)
    total, tokens = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(_device(model))
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        tokens += batch[:, 1:].numel()
    return math.exp(total / tokens)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, passages: list[str], batch_size: int = 32,
                        max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states ``(len(passages), hidden)``, float32 on the CPU."""
    out = []
    for start in range(0, len(passages), batch_size):
        encoded = tokenizer(passages[start : start + batch_size], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt").to(_device(model))
        hidden = model(**encoded).last_hidden_state.float()
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu())
    return torch.cat(out)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity of two ``(n, d)`` embedding matrices."""
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def _halves(passages: list[str]) -> tuple[list[str], list[str]]:
    first, second = [], []
    for passage in passages:
        words = passage.split()
        cut = len(words) // 2
        first.append(" ".join(words[:cut]))
        second.append(" ".join(words[cut:]))
    return first, second


def retrieval_top1(model: nn.Module, tokenizer, passages: list[str], max_length: int = 128) -> float:
    """Share of passages whose first half retrieves its own second half (top-1, cosine)."""
    first, second = _halves(passages)
    queries = torch.nn.functional.normalize(sentence_embeddings(model, tokenizer, first, max_length=max_length), dim=-1)
    keys = torch.nn.functional.normalize(sentence_embeddings(model, tokenizer, second, max_length=max_length), dim=-1)
    best = (queries @ keys.T).argmax(dim=1)
    return float((best == torch.arange(len(passages))).float().mean())


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return int(sum(seen.values()))


@torch.no_grad()
def call_macs(call: Callable[[], Any]) -> int:
    """Multiply-accumulates of ``call()`` (torch FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return int(counter.get_total_flops() // 2)


def count_macs(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass on ``batch`` (torch FLOP counter / 2)."""
    batch = _to_device(batch, _device(model))
    return call_macs(lambda: model(**batch))


@torch.no_grad()
def time_call(call: Callable[[], Any], *, cuda: bool = False, repeats: int = 5,
              warmup: int = 1) -> tuple[float, float, float]:
    """Median, minimum and maximum wall time of ``call()`` over ``repeats`` runs after ``warmup``,
    milliseconds; ``cuda``: synchronize the GPU around every run."""
    times = []
    for index in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times), max(times)


def evaluate_model(model: nn.Module, tokenizer, data: EvalData, reference: dict[str, Any] | None = None,
                   *, speed: bool = True) -> dict[str, Any]:
    """Size, speed and quality of ``model``; ``reference`` is the dense model's result (for cosine).

    Returns a dict with ``params``, ``macs``, ``latency_ms`` and ``perplexity`` (causal) or
    ``retrieval_top1`` / ``cosine_to_dense`` (encoders); ``_embeddings`` holds the encoder's
    embeddings for later comparisons.
    """
    was_training = model.training
    model.eval()
    batch = dict(data.batch)
    if data.causal:
        batch["use_cache"] = False
    result: dict[str, Any] = {"params": count_parameters(model)}
    if speed:
        result["macs"] = count_macs(model, batch)
        device = _device(model)
        moved = _to_device(batch, device)
        median, fastest, slowest = time_call(lambda: model(**moved), cuda=device.type == "cuda",
                                             repeats=LATENCY_REPEATS)
        result["latency_ms"], result["latency_range_ms"] = median, [fastest, slowest]
        result["measured_on"] = {
            "batch": list(data.batch["input_ids"].shape), "latency_repeats": LATENCY_REPEATS, "warmup": 1,
            "device": str(device), "threads": torch.get_num_threads(),
        }
    if data.causal:
        result["perplexity"] = perplexity(model, data.stream, data.seq_len, max_windows=data.max_windows)
    else:
        embeddings = sentence_embeddings(model, tokenizer, data.passages, max_length=data.seq_len)
        result["_embeddings"] = embeddings
        reference_embeddings = embeddings if reference is None else reference["_embeddings"]
        result["cosine_to_dense"] = mean_cosine(embeddings, reference_embeddings)
        result["retrieval_top1"] = retrieval_top1(model, tokenizer, data.passages, max_length=data.seq_len)
    model.train(was_training)
    return result


LATENCY_REPEATS = 5

METRICS = (
    ("params", "parameters", "{:,.0f}"),
    ("macs", "MACs", "{:,.0f}"),
    ("latency_ms", "median latency (ms)", "{:.2f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("cosine_to_dense", "embedding cosine to dense", "{:.4f}"),
    ("retrieval_top1", "retrieval top-1", "{:.4f}"),
)


def format_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A plain-text before/after table of the metrics both results have, with the ratio."""
    rows = [("metric", "dense", "pruned", "pruned/dense")]
    for key, label, fmt in METRICS:
        if key in before and key in after:
            ratio = after[key] / before[key] if before[key] else float("nan")
            rows.append((label, fmt.format(before[key]), fmt.format(after[key]), f"{ratio:.3f}"))
        if key == "latency_ms" and "latency_range_ms" in before and "latency_range_ms" in after:
            spreads = ("{:.2f}-{:.2f}".format(*result["latency_range_ms"]) for result in (before, after))
            rows.append(("  latency range (ms)", *spreads, ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths,
             strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def measurement_note(result: dict[str, Any]) -> str:
    """One line saying what the MACs and latency rows were measured on, or "" when they were not."""
    where = result.get("measured_on")
    if not where:
        return ""
    shape = " x ".join(str(n) for n in where["batch"])
    return (
        f"MACs and latency: one forward pass on a batch of {shape} tokens; latency median (and range) of "
        f"{where['latency_repeats']} runs after {where['warmup']} warm-up, {where['device']}, {where['threads']} "
        "threads (wall time on a shared machine varies from run to run)"
    )


def public(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` without private entries (embeddings), JSON-ready."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
