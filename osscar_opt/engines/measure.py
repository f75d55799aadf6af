"""One model measured in one engine, the same way for ``osscar eval --engine`` and ``benchmarks/deploy.py``.

Causal LMs (:func:`measure_llm`): perplexity on the given windows (the same token ids in every
engine: torch's windows of :func:`osscar_opt.evaluate.perplexity`), prompt-processing and
generation tokens / second. Encoders and CNNs (:func:`measure_batch`): latency per batch and the
largest difference of the engine's output from torch's. llama.cpp and ONNX Runtime run a file
exported (:func:`osscar_opt.deploy.export`) into ``workdir``; its size is reported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from osscar_opt.engines import ENGINES


def check_engine(engine: str, kind: str) -> str:
    """``engine`` if it runs models of ``kind`` ("llm", "encoder", "vision"); else a ValueError naming them."""
    runs = {"llm": ("torch", "llama.cpp"), "encoder": ("torch", "onnxruntime"), "vision": ("torch", "onnxruntime")}
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if engine not in runs[kind]:
        what = {"llm": "a causal LM", "encoder": "an encoder", "vision": "a vision network"}[kind]
        raise ValueError(f"engine: {engine} does not run {what} here; use {' or '.join(runs[kind])}")
    return engine


def windows_of(stream: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    """The ``(count, seq_len)`` windows :func:`osscar_opt.evaluate.perplexity` scores."""
    count = min(stream.numel() // seq_len, max_windows)
    if count == 0:
        raise ValueError(f"eval_text: {stream.numel()} tokens, fewer than seq_len={seq_len}")
    return stream[: count * seq_len].view(count, seq_len)


def measure_llm(model: nn.Module, tokenizer: Any, engine: str, windows: torch.Tensor, prompt: list[int], generate: int,
                *, workdir: Path, outtype: str = "f32", repeats: int = 5, threads: int | None = None,
                name: str = "model") -> dict[str, Any]:
    """Perplexity on ``windows`` and tokens / second of ``model`` in ``engine`` (torch or llama.cpp)."""
    from osscar_opt import evaluate

    check_engine(engine, "llm")
    if engine == "torch":
        from osscar_opt.engines.torch_speed import llm_speed, torch_threads

        with torch_threads(threads):
            ppl = evaluate.perplexity(model, windows.reshape(-1), windows.shape[1], max_windows=None)
        result = llm_speed(model, prompt, generate, repeats=repeats, threads=threads)
        return {**result, "perplexity": ppl, "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    from osscar_opt.deploy import export
    from osscar_opt.engines import llama_cpp

    exported = export(model, Path(workdir) / f"{name}-{outtype}.gguf", outtype=outtype, tokenizer=tokenizer)
    result = llama_cpp.speed(exported.path, prompt, generate, repeats=repeats, threads=threads)
    ppl = llama_cpp.perplexity(exported.path, windows.numpy(), threads=threads)
    return {**result, "perplexity": ppl, "outtype": outtype, "arch": exported.details["arch"],
            "file_bytes": exported.bytes}


def _torch_output(model: nn.Module, inputs: dict[str, torch.Tensor] | torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        if isinstance(inputs, torch.Tensor):
            return model(inputs).numpy()
        return model(**inputs).last_hidden_state.numpy()


def measure_batch(model: nn.Module, engine: str, inputs: dict[str, torch.Tensor] | torch.Tensor, *, workdir: Path,
                  repeats: int = 7, threads: int | None = None, name: str = "model") -> dict[str, Any]:
    """Latency per batch of an encoder (``inputs``: input_ids and attention_mask) or a CNN
    (``inputs``: images) in ``engine`` (torch or onnxruntime)."""
    from osscar_opt.engines.torch_speed import batch_latency, torch_threads

    kind = "vision" if isinstance(inputs, torch.Tensor) else "encoder"
    check_engine(engine, kind)
    if engine == "torch":
        return batch_latency(model, inputs, repeats=repeats, threads=threads)
    from osscar_opt.deploy import export
    from osscar_opt.engines import onnx_runtime

    feed = {"images": inputs} if kind == "vision" else {k: inputs[k] for k in ("input_ids", "attention_mask")}
    exported = export(model, Path(workdir) / f"{name}.onnx", "onnx", sample=inputs)
    session = onnx_runtime.session(exported.path, threads)
    result = onnx_runtime.latency(session, feed, repeats=repeats, threads=threads)
    with torch_threads(threads):
        reference = _torch_output(model, inputs)
    difference = float(np.abs(onnx_runtime.run(session, feed) - reference).max())
    return {**result, "max_abs_difference_to_torch": difference if math.isfinite(difference) else None,
            "file_bytes": exported.bytes}
