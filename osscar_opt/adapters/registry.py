"""The model families osscar_opt can prune, and the adapter for a given model.

This is the only module that imports the concrete adapters; their base classes import none.
"""

from __future__ import annotations

from torch import nn

from osscar_opt.adapters.base import ModelAdapter
from osscar_opt.adapters.bert import BertAdapter
from osscar_opt.adapters.convnet import ConvNetAdapter
from osscar_opt.adapters.convnext import ConvNeXtAdapter
from osscar_opt.adapters.distilbert import DistilBertAdapter
from osscar_opt.adapters.gpt2 import Gpt2Adapter
from osscar_opt.adapters.gpt_neox import GptNeoXAdapter
from osscar_opt.adapters.llama import LlamaAdapter
from osscar_opt.adapters.mobilenet import MobileNetV2Adapter
from osscar_opt.adapters.modernbert import ModernBertAdapter
from osscar_opt.adapters.mpnet import MPNetAdapter
from osscar_opt.adapters.opt import OptAdapter
from osscar_opt.adapters.phi3 import Phi3Adapter
from osscar_opt.adapters.resnet import ResNetAdapter
from osscar_opt.adapters.torchvision_vit import TorchvisionViTAdapter
from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.adapters.vit import ViTAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    BertAdapter, DistilBertAdapter, MPNetAdapter, ModernBertAdapter, OptAdapter, Gpt2Adapter, GptNeoXAdapter,
    ViTAdapter, Phi3Adapter, LlamaAdapter, ResNetAdapter, MobileNetV2Adapter, ConvNeXtAdapter, TorchvisionViTAdapter,
)
"""In the order they are asked: adapters that match a ``model_type`` first, then those that
recognize a decoder by its layout (Phi-3's fused projections, the LLaMA layout)."""


def supported_model_types() -> list[str]:
    """Every transformers ``config.model_type`` some adapter handles."""
    return sorted({t for cls in ADAPTERS if issubclass(cls, TransformerAdapter) for t in cls.model_types})


def vision_architectures() -> tuple[str, ...]:
    """Every torchvision architecture name some adapter handles (``resnet18``, ..., ``mobilenet_v2``)."""
    return tuple(name for cls in ADAPTERS if issubclass(cls, ConvNetAdapter) for name in cls.architectures)


def supported() -> list[str]:
    """Everything supported, for error messages."""
    return supported_model_types() + list(vision_architectures())


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; an unsupported architecture raises ValueError listing the supported."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for cls in ADAPTERS:
        if cls.handles(model):
            return cls(model)
    config = getattr(model, "config", None)
    found = getattr(config, "model_type", type(model).__name__)
    raise ValueError(f"model: unsupported architecture {found!r}; supported: {', '.join(supported())}, and "
                     "decoders with the LLaMA layout (self_attn.{q,k,v,o}_proj + mlp.{gate,up,down}_proj) or the "
                     "Phi-3 layout (self_attn.qkv_proj + mlp.gate_up_proj)")
