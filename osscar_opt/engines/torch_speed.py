"""Eager torch speed, measured the way the other engines are: a causal LM's prompt-processing and
generation tokens / second (greedy, with transformers' KV cache), an encoder's or CNN's latency per
batch; median and range of repeated runs after one warm-up, with the threads stated."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from osscar_opt.engines.timing import spread


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` torch threads (None: as set), restoring the setting after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _generate(model: nn.Module, prompt: torch.Tensor, count: int) -> tuple[float, float]:
    """Seconds of the prompt's forward pass, and of ``count - 1`` greedy steps after the first token."""
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    prompt_seconds = time.perf_counter() - start
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(count - 1):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return prompt_seconds, time.perf_counter() - start


def llm_speed(model: nn.Module, prompt: Sequence[int], generate: int, *, repeats: int = 5,
              threads: int | None = None) -> dict[str, Any]:
    """Prompt-processing and generation tokens / second of a causal LM in eager torch (CPU or where it is)."""
    if generate < 2:
        raise ValueError(f"generate: expected at least 2 tokens, got {generate}")
    device = next(model.parameters()).device
    ids = torch.tensor([list(map(int, prompt))], device=device)
    prompt_rates, generation_rates = [], []
    with torch_threads(threads) as used:
        for run in range(repeats + 1):
            prompt_seconds, generation_seconds = _generate(model.eval(), ids, generate)
            if run:
                prompt_rates.append(ids.shape[1] / prompt_seconds)
                generation_rates.append((generate - 1) / generation_seconds)
    return {"engine": "torch", "threads": used, "prompt_tokens": ids.shape[1], "generated_tokens": generate,
            "repeats": repeats, "prompt_tokens_per_s": spread(prompt_rates),
            "generation_tokens_per_s": spread(generation_rates)}


@torch.no_grad()
def batch_latency(model: nn.Module, inputs: Mapping[str, torch.Tensor] | torch.Tensor, *, repeats: int = 7,
                  threads: int | None = None) -> dict[str, Any]:
    """Milliseconds per forward pass of ``model`` on one batch (keyword inputs, or one image tensor)."""
    call = (lambda: model(inputs)) if isinstance(inputs, torch.Tensor) else (lambda: model(**inputs))
    first = inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))
    times = []
    with torch_threads(threads) as used:
        model.eval()
        call()
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    return {"engine": "torch", "threads": used, "batch": list(first.shape), "repeats": repeats,
            "latency_ms": spread(times)}
