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
from collections.abc import Callable, Sequence
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
               max_windows: int | None = 64, progress: bool = False) -> float:
    """Perplexity of a causal LM on non-overlapping ``seq_len`` windows of ``stream`` (1-D ids);
    ``progress``: a bar over the batches of windows."""
    count = stream.numel() // seq_len
    if count == 0:
        raise ValueError(f"eval_text: {stream.numel()} tokens, fewer than seq_len={seq_len}")
    if max_windows is not None:
        count = min(count, max_windows)
    windows = stream[: count * seq_len].view(count, seq_len)
    total, tokens = 0.0, 0
    for batch in _bar(windows.split(batch_size), progress, "perplexity"):
        batch = batch.to(_device(model))
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        tokens += batch[:, 1:].numel()
    return math.exp(total / tokens)


def _bar(items, progress: bool, description: str):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="batch", leave=False)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, passages: list[str], batch_size: int = 32,
                        max_length: int = 128, progress: bool = False) -> torch.Tensor:
    """Mean-pooled last hidden states ``(len(passages), hidden)``, float32 on the CPU."""
    out = []
    for start in _bar(range(0, len(passages), batch_size), progress, "embeddings"):
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


def wall_ms(call: Callable[[], Any], cuda: bool = False) -> float:
    """Wall time of one ``call()`` in milliseconds; ``cuda``: synchronize the GPU before and after."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


@torch.no_grad()
def time_interleaved(calls: Sequence[Callable[[], Any]], *, rounds: int, warmup: int = 1, cuda: bool = False,
                     measure: Callable[[Callable[[], Any]], float] | None = None) -> list[list[float]]:
    """``times[r][i]``: milliseconds of ``calls[i]`` in round ``r``.

    The calls alternate within each round (A B A B ...), and the call that starts a round rotates,
    so that a slow moment of a shared machine falls on every call alike and the calls of one round
    compare with each other (pair them by round). ``warmup`` untimed rounds first. ``measure(call)``
    times one call (default :func:`wall_ms`)."""
    measure = measure or (lambda call: wall_ms(call, cuda))
    for _ in range(warmup):
        for call in calls:
            call()
    times = []
    for round_index in range(rounds):
        row = [0.0] * len(calls)
        for offset in range(len(calls)):
            index = (round_index + offset) % len(calls)
            row[index] = float(measure(calls[index]))
        times.append(row)
    return times


@dataclass
class LatencyComparison:
    """Dense against pruned latency, timed interleaved: medians and ranges (ms) and the speed-up
    ``dense / pruned`` per round (median and range). ``within_noise``: the two ranges overlap, so
    the difference cannot be told from the machine's noise."""

    dense_ms: float
    dense_range: tuple[float, float]
    pruned_ms: float
    pruned_range: tuple[float, float]
    speedup: float
    speedup_range: tuple[float, float]
    rounds: int

    @property
    def within_noise(self) -> bool:
        return self.pruned_range[0] <= self.dense_range[1] and self.dense_range[0] <= self.pruned_range[1]

    def to_dict(self) -> dict[str, Any]:
        return {"dense_ms": self.dense_ms, "dense_range_ms": list(self.dense_range), "pruned_ms": self.pruned_ms,
                "pruned_range_ms": list(self.pruned_range), "speedup": self.speedup,
                "speedup_range": list(self.speedup_range), "rounds": self.rounds, "within_noise": self.within_noise}


def compare_latency(dense: Callable[[], Any], pruned: Callable[[], Any], *, rounds: int = 7, cuda: bool = False,
                    measure: Callable[[Callable[[], Any]], float] | None = None) -> LatencyComparison:
    """Time ``dense()`` and ``pruned()`` interleaved for ``rounds`` rounds (:func:`time_interleaved`)."""
    times = time_interleaved([dense, pruned], rounds=rounds, cuda=cuda, measure=measure)
    dense_ms, pruned_ms = [row[0] for row in times], [row[1] for row in times]
    ratios = [d / p if p > 0 else float("inf") for d, p in zip(dense_ms, pruned_ms, strict=True)]
    return LatencyComparison(
        statistics.median(dense_ms), (min(dense_ms), max(dense_ms)), statistics.median(pruned_ms),
        (min(pruned_ms), max(pruned_ms)), statistics.median(ratios), (min(ratios), max(ratios)), rounds,
    )


@torch.no_grad()
def time_call(call: Callable[[], Any], *, cuda: bool = False, repeats: int = 5,
              warmup: int = 1) -> tuple[float, float, float]:
    """Median, minimum and maximum wall time of ``call()`` over ``repeats`` runs after ``warmup``,
    milliseconds; ``cuda``: synchronize the GPU around every run."""
    times = [row[0] for row in time_interleaved([call], rounds=repeats, warmup=warmup, cuda=cuda)]
    return statistics.median(times), min(times), max(times)


def evaluate_model(model: nn.Module, tokenizer, data: EvalData, reference: dict[str, Any] | None = None,
                   *, speed: bool = True, progress: bool = False) -> dict[str, Any]:
    """Size, speed and quality of ``model``; ``reference`` is the dense model's result (for cosine).

    Returns a dict with ``params``, ``macs``, ``latency_ms`` and ``perplexity`` (causal) or
    ``retrieval_top1`` / ``cosine_to_dense`` (encoders); ``_embeddings`` holds the encoder's
    embeddings for later comparisons. ``progress``: a bar over the quality passes.
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
        result["perplexity"] = perplexity(model, data.stream, data.seq_len, max_windows=data.max_windows,
                                          progress=progress)
    else:
        embeddings = sentence_embeddings(model, tokenizer, data.passages, max_length=data.seq_len, progress=progress)
        result["_embeddings"] = embeddings
        reference_embeddings = embeddings if reference is None else reference["_embeddings"]
        result["cosine_to_dense"] = mean_cosine(embeddings, reference_embeddings)
        result["retrieval_top1"] = retrieval_top1(model, tokenizer, data.passages, max_length=data.seq_len)
    model.train(was_training)
    return result


LATENCY_REPEATS = 5
COMPARISON_ROUNDS = 9
"""Interleaved rounds of the dense-against-pruned latency row."""


def time_against(dense: nn.Module, pruned: nn.Module, data: EvalData,
                 rounds: int = COMPARISON_ROUNDS) -> LatencyComparison:
    """``dense`` and ``pruned`` timed interleaved on the evaluation batch (both on the same device)."""
    batch = dict(data.batch)
    if data.causal:
        batch["use_cache"] = False
    device = _device(pruned)
    moved = _to_device(batch, device)
    with torch.no_grad():
        return compare_latency(lambda: dense(**moved), lambda: pruned(**moved), rounds=rounds,
                               cuda=device.type == "cuda")


def record_comparison(before: dict[str, Any], after: dict[str, Any], comparison: LatencyComparison) -> None:
    """Put the interleaved timings into the two results (their latency rows and the speed-up)."""
    before["latency_ms"], before["latency_range_ms"] = comparison.dense_ms, list(comparison.dense_range)
    after["latency_ms"], after["latency_range_ms"] = comparison.pruned_ms, list(comparison.pruned_range)
    after["latency_comparison"] = comparison.to_dict()
    for result in (before, after):
        if "measured_on" in result:
            result["measured_on"].update(latency_repeats=comparison.rounds, interleaved=True)


COLLAPSE_PERPLEXITY = 3.0
"""A pruned causal LM whose perplexity is more than this many times the dense one's has collapsed."""
COLLAPSE_COSINE = 0.5
"""An encoder whose embeddings' mean cosine to the dense ones is below this has collapsed."""


COLLAPSE_ADVICE = "prune less, or with a cost target"


def collapse_warning(before: dict[str, Any], after: dict[str, Any], advice: str = COLLAPSE_ADVICE) -> str | None:
    """A warning line when the pruned model's quality collapsed against the dense one's, else None;
    ``advice`` ends it (what the user can change)."""
    if "perplexity" in before and "perplexity" in after and before["perplexity"] > 0:
        ratio = after["perplexity"] / before["perplexity"]
        if ratio > COLLAPSE_PERPLEXITY:
            return (f"warning: quality collapsed: perplexity {after['perplexity']:.2f} against "
                    f"{before['perplexity']:.2f} dense ({ratio:.1f}x, more than {COLLAPSE_PERPLEXITY:g}x); "
                    f"{advice}")
    if "cosine_to_dense" in after and after["cosine_to_dense"] < COLLAPSE_COSINE:
        return (f"warning: quality collapsed: the pruned embeddings' mean cosine to the dense ones is "
                f"{after['cosine_to_dense']:.3f} (below {COLLAPSE_COSINE:g}); {advice}")
    return None

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
            comparison = after.get("latency_comparison")
            if comparison:
                low, high = comparison["speedup_range"]
                noise = "  (within noise)" if comparison["within_noise"] else ""
                rows.append(("  speed-up, dense / pruned", "", f"{comparison['speedup']:.2f}x",
                             f"{low:.2f}-{high:.2f}x{noise}"))
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
    how = (f"{where['latency_repeats']} rounds timing the dense and the pruned model interleaved (the speed-up is the "
           "median of the rounds' ratios)" if where.get("interleaved") else
           f"{where['latency_repeats']} runs after {where['warmup']} warm-up")
    return (
        f"MACs and latency: one forward pass on a batch of {shape} tokens; latency median (and range) of {how}, "
        f"{where['device']}, {where['threads']} threads (wall time on a shared machine varies from run to run)"
    )


def public(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` without private entries (embeddings), JSON-ready."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
