"""What the decoder layouts share (:mod:`~osscar_opt.adapters.llama`, :mod:`~osscar_opt.adapters.phi3`):
where the blocks are, a block's head size, a norm's width, and the warning for an unlisted ``model_type``."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def decoder_blocks(model: nn.Module) -> list[nn.Module] | None:
    """``model.base_model.layers`` when it is a non-empty ``ModuleList``, else None."""
    base = getattr(model, "base_model", None)
    layers = getattr(base, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) and len(layers) > 0 else None


def head_dim_of(attention: nn.Module, config: Any) -> int:
    """The attention's head size: its ``head_dim``, else the config's, else ``hidden_size / heads``."""
    value = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
    return int(value) if value else int(config.hidden_size // config.num_attention_heads)


def norm_size(module: nn.Module) -> int | None:
    """The width a norm module normalizes (its weight's length), or None without a weight."""
    weight = getattr(module, "weight", None)
    return int(weight.numel()) if isinstance(weight, torch.Tensor) else None


def warn_unlisted(config: Any, listed: tuple[str, ...], layout_name: str, layout: str) -> None:
    """Warn that ``config.model_type`` is not one of ``listed`` and is pruned as the ``layout`` it matched."""
    model_type = getattr(config, "model_type", None)
    if model_type not in listed:
        warnings.warn(f"model: model_type {model_type!r} is not a listed family; it matches the {layout_name} layout "
                      f"({layout}) and is pruned as one: check the pruned model's quality", UserWarning, stacklevel=4)
