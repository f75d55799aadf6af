"""A GGUF file run by llama.cpp (through ``llama-cpp-python``): logits, greedy tokens, perplexity, speed.

Quality runs (:func:`logits`, :func:`greedy`, :func:`perplexity`) keep llama.cpp's KV cache in
float32 (its default is float16), so an f32 file is compared with torch on the weights alone.
Speed runs (:func:`speed`) use llama.cpp's defaults, as people serve it: prompt processing is one
``eval`` of the prompt (tokens / second), generation is greedy decoding one token at a time after
it, timed from the first generated token to the last.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from osscar_opt.engines.timing import spread

GGML_TYPE_F32 = 0
"""ggml's type id of float32 (``type_k`` / ``type_v`` of the KV cache)."""


def _llama_cpp():
    from osscar_opt._extras import require

    return require("llama_cpp", "llm", "engine llama.cpp")


@contextlib.contextmanager
def _quiet():
    """llama.cpp prints its loading log on stderr (file descriptor 2); keep it off the terminal."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def open_model(path: str | os.PathLike, *, n_ctx: int, threads: int | None = None, all_logits: bool = False,
               f32_cache: bool = True) -> Any:
    """A ``llama_cpp.Llama`` on ``path``; ``all_logits``: keep the logits of every position
    (:func:`logits`, :func:`perplexity`); a file llama.cpp cannot load is a ValueError naming it."""
    llama_cpp = _llama_cpp()
    if not Path(path).is_file():
        raise ValueError(f"model: {path} is not a file")
    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    threads = threads or os.cpu_count() or 1
    try:
        with _quiet():
            return llama_cpp.Llama(str(path), n_ctx=int(n_ctx), n_batch=max(int(n_ctx), 32), n_threads=threads,
                                   n_threads_batch=threads, logits_all=all_logits, verbose=False, seed=0, **cache)
    except ValueError as exc:
        raise ValueError(f"model: llama.cpp cannot load {path}: {exc}") from exc


def logits(llm: Any, ids: Sequence[int]) -> np.ndarray:
    """``(len(ids), vocab)`` float32 logits of ``ids`` from an empty context (``all_logits`` model)."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm: Any, ids: Sequence[int], count: int) -> list[int]:
    """``count`` tokens after ``ids`` by llama.cpp's own greedy sampler (temperature 0)."""
    llm.reset()
    out: list[int] = []
    for token in llm.generate(list(map(int, ids)), temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == count:
            break
    return out


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(path: str | os.PathLike, windows: np.ndarray, threads: int | None = None) -> float:
    """Perplexity of the GGUF model at ``path`` on ``windows`` (``(count, seq_len)`` token ids, each
    evaluated from an empty context, as :func:`osscar_opt.evaluate.perplexity` does in torch)."""
    windows = np.asarray(windows)
    llm = open_model(path, n_ctx=windows.shape[1], threads=threads, all_logits=True)
    total, tokens = 0.0, 0
    for window in windows:
        scores = _log_softmax(logits(llm, window.tolist())[:-1])
        targets = window[1:]
        total -= float(scores[np.arange(len(targets)), targets].sum())
        tokens += len(targets)
    llm.close()
    return math.exp(total / tokens)


def speed(path: str | os.PathLike, prompt: Sequence[int], generate: int, *, repeats: int = 5,
          threads: int | None = None) -> dict[str, Any]:
    """Prompt-processing and generation tokens / second of the GGUF model at ``path``: ``repeats``
    runs (after one warm-up) of evaluating ``prompt`` and then ``generate`` greedy tokens; median
    and range of each, with the threads and token counts."""
    if generate < 2:
        raise ValueError(f"generate: expected at least 2 tokens, got {generate}")
    threads = threads or os.cpu_count() or 1
    llm = open_model(path, n_ctx=len(prompt) + generate + 1, threads=threads, f32_cache=False)
    prompt = list(map(int, prompt))
    prompt_rates, generation_rates = [], []
    for run in range(repeats + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prompt_seconds = time.perf_counter() - start
        first = end = None
        count = 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):  # the prompt is cached: no re-eval
            count += 1
            end = time.perf_counter()
            first = first or end
            if count == generate:
                break
        if run:  # the first run warms up
            prompt_rates.append(len(prompt) / prompt_seconds)
            generation_rates.append((count - 1) / (end - first))
    llm.close()
    return {"engine": "llama.cpp", "threads": threads, "prompt_tokens": len(prompt), "generated_tokens": generate,
            "repeats": repeats, "prompt_tokens_per_s": spread(prompt_rates),
            "generation_tokens_per_s": spread(generation_rates)}


def generation_rounds(paths: Sequence[str | os.PathLike], prompt: Sequence[int], generate: int, *, rounds: int = 7,
                      threads: int | None = None) -> list[dict[str, Any]]:
    """Generation tokens / second of several GGUF files timed interleaved: in every round each file
    evaluates ``prompt`` and generates ``generate`` greedy tokens, the file that starts a round
    rotating, so a slow moment of a shared machine falls on every file alike. Per file: the
    median and range over rounds, and against the first file the median and range of the
    per-round ratios (this file's rate / the first's)."""
    if generate < 2:
        raise ValueError(f"generate: expected at least 2 tokens, got {generate}")
    threads = threads or os.cpu_count() or 1
    models = [open_model(path, n_ctx=len(prompt) + generate + 1, threads=threads, f32_cache=False) for path in paths]
    prompt = list(map(int, prompt))
    rates = [[0.0] * len(models) for _ in range(rounds + 1)]
    for round_index in range(rounds + 1):  # round 0 warms up
        for offset in range(len(models)):
            index = (round_index + offset) % len(models)
            llm = models[index]
            llm.reset()
            llm.eval(prompt)
            first = end = None
            for count, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), start=1):
                end = time.perf_counter()
                first = first or end
                if count == generate:
                    break
            rates[round_index][index] = (generate - 1) / (end - first)
    for llm in models:
        llm.close()
    timed = rates[1:]
    return [{"path": str(path), "threads": threads, "rounds": rounds,
             "generation_tokens_per_s": spread([row[i] for row in timed]),
             "against_first": spread([row[i] / row[0] for row in timed])} for i, path in enumerate(paths)]
