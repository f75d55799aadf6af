"""Deploy: export a (pruned or dense) model to a file a serving engine runs: GGUF for llama.cpp, ONNX for ONNX Runtime.

``export(model_or_folder, path, format="gguf", outtype="f32")``: every argument is checked before
any work (format, outtype, the output path like ``save_pruned``'s, a model whose pruning failed
part-way, the family); the file is written under a temporary name beside ``path`` and renamed
into place, so a failed export leaves no partial file. ``gguf`` (:mod:`osscar_opt.deploy.gguf`):
LLaMA-family causal LMs, per-layer widths included; ``onnx`` (:mod:`osscar_opt.deploy.onnx`):
BERT-family encoders and torchvision ResNet / MobileNetV2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from osscar_opt.deploy.files import check_output_file, write_atomically

FORMATS = ("gguf", "onnx")
OUTTYPES = ("f32", "f16", "q8_0")

__all__ = ["FORMATS", "OUTTYPES", "ExportResult", "export"]


@dataclass
class ExportResult:
    """What :func:`export` wrote: the file, its format and size, and format details (GGUF:
    ``arch`` llama or deci, per-layer widths, tensor types; ONNX: opset, inputs)."""

    path: Path
    format: str
    bytes: int
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"wrote {self.path} ({self.format}, {self.bytes / 2**20:.1f} MiB)"]
        if self.format == "gguf":
            parts.append(f"architecture {self.details['arch']}, {self.details['outtype']}")
            fallback = self.details.get("f16_instead_of_q8_0") or []
            if fallback:
                parts.append(f"{len(fallback)} matrices f16 (rows not a multiple of 32: q8_0 cannot hold them; "
                             "--multiple-of 32 avoids it)")
        return "; ".join(parts + self.notes)


def _check_choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _load(model_or_folder: nn.Module | str | os.PathLike) -> tuple[nn.Module, Any]:
    """The model (and the tokenizer of a folder) to export; a folder is a saved pruned model or a
    Hugging Face model folder."""
    if isinstance(model_or_folder, nn.Module):
        return model_or_folder, None
    if not isinstance(model_or_folder, str | os.PathLike):
        raise ValueError(f"model_or_folder: expected a torch model or a model folder, got "
                         f"{type(model_or_folder).__name__}")
    folder = Path(model_or_folder)
    if not folder.is_dir():
        raise ValueError(f"model_or_folder: {folder} is not a folder (expected a saved pruned model or a Hugging "
                         "Face model folder)")
    from osscar_opt.io import META_FILE, load_pruned

    if (folder / META_FILE).is_file():
        model = load_pruned(folder)
    else:
        from osscar_opt.models import load_model

        model = load_model(str(folder), device="cpu").model
    tokenizer = None
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from osscar_opt.models import folder_tokenizer

        tokenizer = folder_tokenizer(folder)
    return model, tokenizer


def _gguf_family(model: nn.Module) -> None:
    """Refuse models that are not LLaMA-family causal LMs, naming the supported ones."""
    from osscar_opt.adapters.registry import adapter_for

    supported = "LLaMA-family causal LMs (llama, qwen2, mistral)"
    try:
        adapter = adapter_for(model)
    except ValueError:
        adapter = None
    if adapter is None or adapter.family != "llama" or model.get_output_embeddings() is None:
        raise ValueError(f"model: GGUF export supports {supported}; got a {type(model).__name__}. "
                         "ONNX export (format='onnx') takes BERT-family encoders and torchvision ResNet / MobileNetV2")


def export(model_or_folder: nn.Module | str | os.PathLike, path: str | os.PathLike, format: str | None = None, *,
           outtype: str = "f32", tokenizer: Any = None, sample: Any = None, opset: int | None = None) -> ExportResult:
    """Write ``model_or_folder`` (a model, or a folder of ``save_pruned`` / a Hugging Face folder) to ``path``.

    ``format`` (default: from the suffix of ``path``) ``"gguf"``: a LLaMA-family causal LM for
    llama.cpp; ``outtype`` f32, f16 or q8_0 (matrices whose rows are not a multiple of 32 stay f16
    in q8_0, and the result says which). The tokenizer
    (``tokenizer=``, or the folder's) is carried into the file; one llama.cpp would split differently
    is refused. ``format="onnx"``: a BERT-family encoder (inputs ``input_ids``, ``attention_mask``,
    output ``last_hidden_state``) or a torchvision ResNet / MobileNetV2 (input ``images``, output
    ``logits``), batch, sequence and image axes dynamic; ``sample`` (an input batch) is optional.
    Returns an :class:`ExportResult`.
    """
    if format is None:
        format = Path(str(path)).suffix.lower().lstrip(".")
        if format not in FORMATS:
            raise ValueError(f"format: not given and path {str(path)!r} does not end in .gguf or .onnx")
    format = _check_choice(format, FORMATS, "format")
    outtype = _check_choice(outtype, OUTTYPES, "outtype")
    if format == "onnx" and outtype != "f32":
        raise ValueError(f"outtype: ONNX export writes float32 weights; got {outtype!r}")
    target = check_output_file(path, format)
    model, folder_tokenizer = _load(model_or_folder)
    if getattr(model, "osscar_state", None) == "incomplete":
        raise ValueError("model: its pruning failed part-way (model.osscar_state == 'incomplete'): some blocks are cut "
                         "and others are not; reload the dense model and prune again")
    if format == "gguf":
        return _export_gguf(model, tokenizer if tokenizer is not None else folder_tokenizer, target, outtype)
    from osscar_opt.deploy.onnx import export_onnx, plan_onnx

    plan = plan_onnx(model, sample)
    details = write_atomically(target, lambda temporary: export_onnx(plan, temporary, opset))
    return ExportResult(target, format, target.stat().st_size, details)


def _export_gguf(model: nn.Module, tokenizer: Any, target: Path, outtype: str) -> ExportResult:
    from osscar_opt._extras import require

    require("gguf", "llm", "format: GGUF export")
    _gguf_family(model)
    from osscar_opt.deploy.gguf import plan_gguf, write_gguf
    from osscar_opt.deploy.gguf_tokenizer import gguf_vocab

    plan = plan_gguf(model)
    if tokenizer is None:
        raise ValueError("tokenizer: GGUF export needs the model's tokenizer (llama.cpp reads it from the file): pass "
                         "tokenizer=, or export a saved folder that holds one")
    vocab = gguf_vocab(tokenizer, int(model.base_model.embed_tokens.num_embeddings))
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    details = write_atomically(target, lambda temporary: write_gguf(model, plan, vocab, temporary, outtype,
                                                                      Path(name).name or name))
    details.update(outtype=outtype, head_dim=plan.head_dim,
                   layers=[{"heads": w.heads, "kv_heads": w.kv_heads, "neurons": w.neurons} for w in plan.layers],
                   tokenizer_pre=vocab.pre)
    return ExportResult(target, "gguf", target.stat().st_size, details, list(plan.notes))
