"""A LLaMA-family causal LM (LLaMA, Qwen2, Mistral; dense or pruned) as a GGUF file llama.cpp runs.

The architecture follows llama.cpp's own loader (``src/llama-model.cpp``, ``src/models/llama.cpp``,
``src/models/deci.cpp``): the same widths in every block are written as ``llama``; per-layer widths
as ``deci`` (DeciLM / Nemotron-NAS), whose loader reads ``deci.attention.head_count``,
``deci.attention.head_count_kv`` and ``deci.feed_forward_length`` as arrays with one entry per
block and builds every block with its own widths. Both read the same tensor names
(``token_embd``, ``blk.N.attn_q`` ... ``blk.N.ffn_down``, ``output_norm``, ``output``) and the
optional Q / K / V / output and MLP biases (Qwen2's Q / K / V biases). The head size is written
(``attention.key_length`` / ``value_length`` / ``rope.dimension_count``) because llama.cpp
would otherwise derive it from ``embedding_length / head_count`` of the first block.

Emptied sublayers (``allow_empty``, :mod:`osscar_opt.formulations.empty`) are written as ``deci``
blocks with a head count of 0: llama.cpp's deci loader then creates no attention tensors and its
graph skips attention there (Nemotron-51B's attention-free layers). Two cases llama.cpp's deci
cannot say are written as exact zero sublayers instead (checked against torch in the tests): an
emptied attention in block 0 (llama.cpp reads the head size only when block 0 has heads) becomes one
head whose projections are zero, and an emptied MLP in a block that keeps its attention becomes one
neuron whose projections are zero (at a feed-forward length of 0 llama.cpp's deci graph skips the
rest of the block, attention output included); both add exactly 0 to the residual stream, and the
plan's notes say so. An emptied sublayer that kept a bias (a constant added to the residual
stream) has no place there and is refused.

Rotary embeddings: llama.cpp's ``llama`` and ``deci`` rotate adjacent pairs of a head's
dimensions, transformers rotates dimension ``i`` with ``i + head_dim / 2``; the rows of ``q_proj``
and ``k_proj`` (weights and biases) are therefore reordered per head, with each block's own head
counts. A rotary scaling that only rescales the frequencies (``linear``, ``llama3``) is written as
llama.cpp's ``rope_freqs`` tensor (the ratio of the unscaled to the scaled inverse frequencies);
scalings that change the attention scale or depend on the sequence length (YaRN, dynamic,
LongRoPE) are refused. A sliding window (Mistral) caps the written context length: neither
``llama`` nor ``deci`` applies one, and within the window the two engines compute the same thing.

Every parameter of the model must have its place in the file; one that does not (a norm inside
attention, another activation) refuses the model before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from osscar_opt.formulations.empty import is_empty

OUTTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32
"""Values per Q8_0 block: a weight whose rows are not a multiple of this is written as f16 instead."""


@dataclass
class LayerWidths:
    """One block's widths: query heads, key-value heads, MLP neurons."""

    heads: int
    kv_heads: int
    neurons: int


@dataclass
class GGUFPlan:
    """What :func:`write_gguf` writes: the architecture, widths and (name, tensor, kind) rows."""

    arch: str
    head_dim: int
    layers: list[LayerWidths]
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    rope_freqs: torch.Tensor | None = None
    context_length: int = 0
    notes: list[str] = field(default_factory=list)


def _refuse(reason: str) -> ValueError:
    return ValueError(f"model: cannot be exported to GGUF: {reason}")


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    theta = parameters.get("rope_theta") if isinstance(parameters, dict) else None
    theta = theta if theta is not None else getattr(config, "rope_theta", None)
    return float(theta if theta is not None else 10000.0)


def rope_frequency_factors(rotary: nn.Module, theta: float, head_dim: int) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` (unscaled / scaled inverse frequency per pair of dimensions), or
    None when the model's frequencies are the unscaled ones; a ValueError for scalings llama.cpp's
    ``llama`` / ``deci`` cannot apply."""
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise _refuse(f"rotary scaling {rope_type!r} (only none, linear and llama3 can be written)")
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise _refuse("its rotary embedding rescales attention (attention_scaling != 1)")
    inv_freq = rotary.inv_freq.detach().to(torch.float64).cpu()
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if inv_freq.shape != plain.shape:
        raise _refuse(f"rotary frequencies of shape {tuple(inv_freq.shape)} for a head size of {head_dim}")
    if torch.allclose(inv_freq, plain, rtol=1e-6, atol=0):
        return None
    return (plain / inv_freq).to(torch.float32)


def _rotary_order(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of ``q_proj`` / ``k_proj`` (or their bias) reordered per head from transformers' half
    rotation to llama.cpp's pairwise rotation: head row ``j`` of the first half and ``j`` of the
    second become rows ``2j`` and ``2j + 1``."""
    size = rows.shape[0] // heads
    return rows.reshape(heads, 2, size // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _context_length(config: Any) -> tuple[int, str | None]:
    length = int(getattr(config, "max_position_embeddings", 0) or 0)
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(config, "layer_types", None)
    if layer_types and "sliding_attention" not in layer_types:
        window = None
    if window and (not length or int(window) < length):
        return int(window), (f"context length capped at the sliding window ({int(window)} tokens): llama.cpp's "
                             "llama / deci apply no window")
    return length, None


def _linear(module: nn.Module, name: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise _refuse(f"{name} is a {type(module).__name__}, not a Linear layer")
    return module


def plan_gguf(model: nn.Module) -> GGUFPlan:
    """The :class:`GGUFPlan` of a LLaMA-family causal LM; a ValueError naming ``model`` for any
    model llama.cpp's ``llama`` / ``deci`` would not run as transformers does."""
    config = model.config
    base = model.base_model
    if getattr(config, "hidden_act", "silu") != "silu":
        raise _refuse(f"activation {config.hidden_act!r} (llama.cpp's llama / deci use SiLU)")
    head_dims = {int(block.self_attn.head_dim) for block in base.layers}  # an emptied attention keeps its head size
    if len(head_dims) != 1:
        raise _refuse(f"head sizes differ between blocks ({sorted(head_dims)})")
    head_dim = head_dims.pop()
    if head_dim % 2:
        raise _refuse(f"odd head size {head_dim} (rotary embeddings rotate pairs)")
    plan = GGUFPlan("llama", head_dim, [])
    names: dict[int, str] = {}

    def add(name: str, tensor: torch.Tensor) -> None:
        plan.tensors.append((name, tensor.detach()))
        names[id(tensor)] = name

    add("token_embd.weight", base.embed_tokens.weight)
    for index, block in enumerate(base.layers):
        prefix = f"blk.{index}"
        widths = LayerWidths(0, 0, 0)
        if not is_empty(block.self_attn):
            widths.heads, widths.kv_heads = _add_attention(block, index, head_dim, add, names)
            add(f"{prefix}.attn_norm.weight", block.input_layernorm.weight)
        elif block.self_attn.bias is not None:
            raise _refuse(f"layer {index}'s removed attention adds a bias, which llama.cpp's deci cannot")
        elif index == 0:
            widths.heads = widths.kv_heads = 1
            _add_zero_attention(prefix, int(config.hidden_size), head_dim, add)
            plan.notes.append("block 0's removed attention written as one head of zeros (llama.cpp reads the head "
                              "size from block 0)")
        if not is_empty(block.mlp):
            gate, up, down = (_linear(getattr(block.mlp, part), f"layer {index} {part}")
                              for part in ("gate_proj", "up_proj", "down_proj"))
            widths.neurons = gate.out_features
            for part, gguf_name in ((gate, "ffn_gate"), (up, "ffn_up"), (down, "ffn_down")):
                _add_linear(f"{prefix}.{gguf_name}", part, add)
            add(f"{prefix}.ffn_norm.weight", block.post_attention_layernorm.weight)
        elif block.mlp.bias is not None:
            raise _refuse(f"layer {index}'s removed MLP adds a bias, which llama.cpp's deci cannot")
        elif widths.heads > 0:
            widths.neurons = 1
            _add_zero_mlp(prefix, int(config.hidden_size), add)
            plan.notes.append(f"block {index}'s removed MLP written as one neuron of zeros (llama.cpp's deci skips "
                              "the rest of a block without one)")
        plan.layers.append(widths)
    add("output_norm.weight", base.norm.weight)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not base.embed_tokens.weight:
        add("output.weight", head.weight)
        if getattr(head, "bias", None) is not None:
            raise _refuse("the output layer has a bias")
    unplaced = [name for name, parameter in model.named_parameters() if id(parameter) not in names]
    if unplaced:
        raise _refuse(f"parameters without a place in llama.cpp's llama / deci: {', '.join(unplaced[:5])}")
    if any(widths != plan.layers[0] or 0 in (widths.heads, widths.neurons) for widths in plan.layers):
        plan.arch = "deci"
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise _refuse("no rotary embedding module (model.rotary_emb)")
    plan.rope_freqs = rope_frequency_factors(rotary, _rope_theta(config), head_dim)
    plan.context_length, note = _context_length(config)
    if note:
        plan.notes.append(note)
    return plan


def _add_attention(block: nn.Module, index: int, head_dim: int, add, names: dict[int, str]) -> tuple[int, int]:
    """Plan block ``index``'s attention tensors (Q / K rows in llama.cpp's rotary order); its
    query and key-value head counts."""
    attention = block.self_attn
    q, k, v, o = (_linear(getattr(attention, part), f"layer {index} {part}")
                  for part in ("q_proj", "k_proj", "v_proj", "o_proj"))
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if heads % max(kv_heads, 1) or v.out_features != k.out_features:
        raise _refuse(f"layer {index} has {heads} query heads over {kv_heads} key-value heads")
    prefix = f"blk.{index}"
    for part, gguf_name, count in ((q, "attn_q", heads), (k, "attn_k", kv_heads)):
        add(f"{prefix}.{gguf_name}.weight", _rotary_order(part.weight.detach(), count))
        names[id(part.weight)] = f"{prefix}.{gguf_name}.weight"
        if part.bias is not None:
            add(f"{prefix}.{gguf_name}.bias", _rotary_order(part.bias.detach(), count))
            names[id(part.bias)] = f"{prefix}.{gguf_name}.bias"
    for part, gguf_name in ((v, "attn_v"), (o, "attn_output")):
        _add_linear(f"{prefix}.{gguf_name}", part, add)
    return heads, kv_heads


def _add_linear(name: str, part: nn.Linear, add) -> None:
    """Plan a Linear layer's weight (and bias) as ``<name>.weight`` (``<name>.bias``)."""
    add(f"{name}.weight", part.weight)
    if part.bias is not None:
        add(f"{name}.bias", part.bias)


def _add_zero_attention(prefix: str, hidden: int, head_dim: int, add) -> None:
    """One query and key-value head whose projections are zero: adds exactly 0 to the residual stream."""
    for name, shape in (("attn_q", (head_dim, hidden)), ("attn_k", (head_dim, hidden)), ("attn_v", (head_dim, hidden)),
                        ("attn_output", (hidden, head_dim))):
        add(f"{prefix}.{name}.weight", torch.zeros(shape))
    add(f"{prefix}.attn_norm.weight", torch.ones(hidden))


def _add_zero_mlp(prefix: str, hidden: int, add) -> None:
    """One MLP neuron whose projections are zero: adds exactly 0 to the residual stream."""
    for name, shape in (("ffn_gate", (1, hidden)), ("ffn_up", (1, hidden)), ("ffn_down", (hidden, 1))):
        add(f"{prefix}.{name}.weight", torch.zeros(shape))
    add(f"{prefix}.ffn_norm.weight", torch.ones(hidden))


def _encoded(tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, Any, str]:
    """The array to write, its GGML type (None: from the numpy dtype) and the type's name.

    Vectors (norms, biases) stay f32 in every outtype, as in llama.cpp's own converter; a matrix
    whose rows are not a multiple of 32 values cannot be Q8_0 and is written f16."""
    from gguf import GGMLQuantizationType, quants

    array = tensor.detach().to(torch.float32).cpu().numpy()
    if outtype == "f32" or array.ndim < 2:
        return array, None, "f32"
    if outtype == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0, "q8_0"
    return array.astype(np.float16), None, "f16"


FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}
"""``general.file_type`` (llama.cpp's ``llama_ftype``: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0)."""


def _per_layer(values: list[int], arch: str) -> int | list[int]:
    return values if arch == "deci" else values[0]


def write_gguf(model: nn.Module, plan: GGUFPlan, vocab: Any, path: Path, outtype: str, name: str) -> dict[str, Any]:
    """Write ``model`` as planned (:func:`plan_gguf`) with the tokenizer ``vocab``
    (:func:`~osscar_opt.deploy.gguf_tokenizer.gguf_vocab`) to ``path``; what was written, by type."""
    import gguf

    from osscar_opt.deploy.gguf_tokenizer import write_vocab

    config = model.config
    writer = gguf.GGUFWriter(None, plan.arch)
    writer.add_name(name)
    writer.add_context_length(plan.context_length)
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(plan.layers))
    writer.add_feed_forward_length(_per_layer([w.neurons for w in plan.layers], plan.arch))
    writer.add_head_count(_per_layer([w.heads for w in plan.layers], plan.arch))
    writer.add_head_count_kv(_per_layer([w.kv_heads for w in plan.layers], plan.arch))
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_file_type(FILE_TYPES[outtype])
    write_vocab(writer, vocab)
    written: dict[str, list[str]] = {}
    tensors = list(plan.tensors)
    if plan.rope_freqs is not None:
        tensors.append(("rope_freqs.weight", plan.rope_freqs))
    for tensor_name, tensor in tensors:
        array, raw_type, type_name = _encoded(tensor, outtype)
        writer.add_tensor(tensor_name, array, raw_dtype=raw_type)
        written.setdefault(type_name, []).append(tensor_name)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"arch": plan.arch, "tensor_types": {k: len(v) for k, v in written.items()},
            "f16_instead_of_q8_0": written.get("f16", []) if outtype == "q8_0" else []}
