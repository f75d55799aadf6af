"""The small interface between the driver and one model family.

A :class:`ModelAdapter` says which modules are the transformer blocks, which prunable structures
(:class:`~osscar_opt.formulations.structures.Structure`) each block has, how to call a block on
its own, and how to describe / restore per-block dimensions for save and reload. One adapter file
per model family; the driver never branches on model names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

from osscar_opt.formulations.structures import Structure


def size_setter(module: nn.Module, **per_group: int) -> Callable[[int], None]:
    """``on_resize`` for a structure: after surgery sets ``module.<name> = keep * per_group[name]``.

    E.g. ``size_setter(attention, num_heads=1, split_size=head_dim)`` for GPT-2 attention.
    """

    def resize(keep: int) -> None:
        for name, unit in per_group.items():
            setattr(module, name, keep * unit)

    return resize


class ModelAdapter:
    """Base class of the model-family adapters.

    Subclasses set ``family`` and ``model_types`` (the transformers ``config.model_type`` values
    they handle, also used in error messages), and implement :meth:`blocks`, :meth:`attention`,
    :meth:`mlp`.
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    causal_lm: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """True when ``model`` is a transformers model of one of ``model_types``."""
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in cls.model_types

    # ---------------------------------------------------------------- structure
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in forward order."""
        raise NotImplementedError

    def block_name(self, index: int) -> str:
        """Qualified module name of block ``index``."""
        block = self.blocks()[index]
        for name, module in self.model.named_modules():
            if module is block:
                return name
        raise ValueError(f"model: block {index} is not a submodule of the model")

    def attention(self, block: nn.Module, prefix: str) -> Structure:
        """The attention structure (heads, or KV groups for GQA) of ``block``."""
        raise NotImplementedError

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        """The MLP neuron structure of ``block``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- dimensions
    def block_dims(self, block: nn.Module) -> dict[str, int]:
        """Per-block dimensions: kept attention groups and MLP neurons."""
        return {
            "attention_groups": self.attention(block, "").num_groups,
            "mlp_neurons": self.mlp(block, "").num_groups,
        }

    def dims(self) -> list[dict[str, int]]:
        """Dimensions of every block, for the saved metadata."""
        return [self.block_dims(block) for block in self.blocks()]

    def restore_dims(self, dims: list[dict[str, Any]]) -> None:
        """Shrink a freshly built dense model to saved per-block ``dims`` (values are reloaded after)."""
        from osscar_opt.surgery import resize_empty

        blocks = self.blocks()
        if len(dims) != len(blocks):
            raise ValueError(f"dims: {len(dims)} blocks saved, model has {len(blocks)}")
        for block, entry in zip(blocks, dims, strict=True):
            attention = self.attention(block, "")
            if int(entry["attention_groups"]) != attention.num_groups:
                resize_empty(block, attention, int(entry["attention_groups"]))
            mlp = self.mlp(block, "")
            if int(entry["mlp_neurons"]) != mlp.num_groups:
                resize_empty(block, mlp, int(entry["mlp_neurons"]))


def _registry() -> list[type[ModelAdapter]]:
    from osscar_opt.adapters.bert import BertAdapter
    from osscar_opt.adapters.gpt2 import Gpt2Adapter
    from osscar_opt.adapters.llama import LlamaAdapter
    from osscar_opt.adapters.opt import OptAdapter

    return [BertAdapter, OptAdapter, LlamaAdapter, Gpt2Adapter]


def supported_model_types() -> list[str]:
    """Every transformers ``model_type`` some adapter handles."""
    return sorted({t for cls in _registry() for t in cls.model_types})


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; an unsupported architecture raises ValueError listing the supported."""
    for cls in _registry():
        if cls.handles(model):
            return cls(model)
    config = getattr(model, "config", None)
    found = getattr(config, "model_type", type(model).__name__)
    raise ValueError(
        f"model: unsupported architecture {found!r}; supported: {', '.join(supported_model_types())}"
    )
