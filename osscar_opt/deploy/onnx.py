"""A BERT-family encoder or a torchvision ResNet / MobileNetV2 (dense or pruned) as an ONNX file for ONNX Runtime.

``torch.onnx.export`` traces the model as it is, so pruned widths (per-layer head counts, neurons,
channels) are simply the shapes of its weights. Encoders take ``input_ids`` and
``attention_mask`` (``(batch, sequence)`` int64) and give ``last_hidden_state``; vision networks
take ``images`` (``(batch, 3, height, width)`` float32) and give ``logits``. The batch and
sequence axes of encoders and the batch, height and width axes of vision networks are dynamic.
Weights are float32. The exporter is torch's TorchScript-based one (``dynamo=False``): it traces
transformers' encoders as they run; the trace is checked by the tests at other batch and
sequence sizes than the one it was made with.

Causal LMs are not exported to ONNX here: without a KV cache every generated token would re-run
the whole prefix, which is not how anyone serves them (their engine here is llama.cpp, GGUF).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_OPSET = 18
ENCODER_INPUTS = ("input_ids", "attention_mask")
VISION_INPUTS = ("images",)


@dataclass
class OnnxPlan:
    """What :func:`export_onnx` traces: a wrapper that returns one tensor, its sample inputs, names and axes."""

    kind: str  # "encoder" or "vision"
    module: nn.Module
    sample: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_name: str
    dynamic_axes: dict[str, dict[int, str]]


class _EncoderOutput(nn.Module):
    """``(input_ids, attention_mask) -> last_hidden_state`` of a transformers encoder."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _kind(model: nn.Module) -> str:
    from osscar_opt.adapters.registry import adapter_for

    supported = "BERT-family encoders (bert) and torchvision ResNet / MobileNetV2"
    try:
        family = adapter_for(model).family
    except ValueError:
        family = None
    if family == "bert" and hasattr(model, "get_input_embeddings"):
        return "encoder"
    if family in ("resnet", "mobilenet"):
        return "vision"
    raise ValueError(f"model: ONNX export supports {supported}; got a {type(model).__name__}. "
                     "GGUF export (format='gguf') takes LLaMA-family causal LMs")


def _encoder_sample(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = int(model.get_input_embeddings().num_embeddings)
    ids = torch.randint(1, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return ids, mask


def plan_onnx(model: nn.Module, sample: Any = None) -> OnnxPlan:
    """The :class:`OnnxPlan` of ``model``; ``sample``: an input batch (encoders: a mapping with
    ``input_ids`` and ``attention_mask``, or ids alone; vision: images), else a made-up one."""
    kind = _kind(model)
    model = model.eval()
    if kind == "encoder":
        if sample is None:
            inputs = _encoder_sample(model)
        elif isinstance(sample, torch.Tensor):
            inputs = (sample.long(), torch.ones_like(sample, dtype=torch.long))
        else:
            try:
                inputs = tuple(torch.as_tensor(sample[name]).long() for name in ENCODER_INPUTS)
            except (KeyError, TypeError) as exc:
                raise ValueError("sample: expected token ids or a mapping with input_ids and attention_mask") from exc
        axes = {name: {0: "batch", 1: "sequence"} for name in ENCODER_INPUTS}
        axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
        return OnnxPlan(kind, _EncoderOutput(model).eval(), inputs, ENCODER_INPUTS, "last_hidden_state", axes)
    if sample is None:
        sample = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
        raise ValueError("sample: expected a (batch, 3, height, width) image tensor")
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
    return OnnxPlan(kind, model, (sample.float(),), VISION_INPUTS, "logits", axes)


def export_onnx(plan: OnnxPlan, path: Path, opset: int | None = None) -> dict[str, Any]:
    """Trace ``plan`` to ``path``; the opset, input and output names."""
    from osscar_opt._extras import require

    require("onnx", "deploy", "format: ONNX export")
    opset = int(opset or DEFAULT_OPSET)
    with torch.no_grad():
        torch.onnx.export(plan.module, plan.sample, str(path), input_names=list(plan.input_names),
                          output_names=[plan.output_name], dynamic_axes=plan.dynamic_axes, opset_version=opset,
                          dynamo=False)
    return {"kind": plan.kind, "opset": opset, "inputs": list(plan.input_names), "output": plan.output_name}
