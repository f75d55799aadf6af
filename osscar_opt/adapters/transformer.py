"""What every transformers family shares: blocks as stages, capture at the first block, dims.

A family subclass of :class:`TransformerAdapter` says which ``config.model_type`` values it
handles, where the blocks are, and how to build the attention and MLP structures of one block.
Calibration data is ``(samples, seq_len)`` token ids; the model runs up to its first block, where
a hook records the hidden states and the extra arguments (masks, position embeddings) that the
model passes to its blocks, so every block can then be run on its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from osscar_opt.adapters.base import ModelAdapter, Stage, StageCall, check_batch_size, model_device
from osscar_opt.formulations.structures import Structure


def token_ids_of(encoding: Mapping[str, Any]) -> torch.Tensor:
    """``input_ids`` of a tokenizer's output (``BatchEncoding`` or dict); rows with padded
    positions (zeros in ``attention_mask``) are refused: every calibration position must be a
    real token."""
    if "input_ids" not in encoding:
        raise ValueError(f"calibration: a mapping needs 'input_ids' (a tokenizer's output), got keys {list(encoding)}")
    try:
        ids = torch.as_tensor(encoding["input_ids"])
    except (ValueError, TypeError) as exc:
        raise ValueError("calibration: input_ids of different lengths; tokenize to equal lengths without "
                         "padding, or pass the texts to osscar_opt.oneshot, which cuts equal windows") from exc
    mask = encoding.get("attention_mask")
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        raise ValueError(
            "calibration: the attention_mask has padded positions; calibration rows must be all real tokens "
            "(pass the texts to osscar_opt.oneshot, which cuts equal-length windows from them)"
        )
    return ids


class _Stop(Exception):
    """Raised by the input catcher to end a forward pass at the first block."""


class TransformerAdapter(ModelAdapter):
    """Base of the transformers families: stages are the blocks, structures attention then MLP.

    Subclasses set ``family``, ``model_types`` (the ``config.model_type`` values they handle) and
    ``causal_lm``, and implement :meth:`blocks`, :meth:`attention` and :meth:`mlp`.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    causal_lm: ClassVar[bool] = False
    mlp_size_field: ClassVar[str] = "intermediate_size"
    """The config field holding the MLP width (``intermediate_size``, ``ffn_dim``, ``n_inner``)."""
    heads_field: ClassVar[str] = "num_attention_heads"
    """The config field holding the number of attention heads. In the base implementation of
    :meth:`config_fields` the head size is ``hidden_size / heads``, so a pruned head count cannot be
    written in the config; families with an explicit ``head_dim`` field override it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.config = model.config

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """True when ``model`` is a transformers model of one of ``model_types``."""
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in cls.model_types

    # ---------------------------------------------------------------- family specifics
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in forward order."""
        raise NotImplementedError

    def attention(self, block: nn.Module, prefix: str) -> Structure:
        """The attention structure (heads, or KV groups for GQA) of ``block``."""
        raise NotImplementedError

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        """The MLP neuron structure of ``block``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- stages
    def stages(self) -> list[Stage]:
        stages = []
        for block in self.blocks():
            prefix = self.qualified_name(block)
            stages.append(Stage(prefix, block, self._structures_of(prefix)))
        return stages

    def _structures_of(self, prefix: str):
        def structures(block: nn.Module) -> list[Structure]:
            return [self.attention(block, prefix), self.mlp(block, prefix)]

        return structures

    def calibration_batches(self, calibration: Any, batch_size: int) -> list[torch.Tensor]:
        """``(samples, seq_len)`` int64 token ids (or a tokenizer's output without padding, see
        :func:`token_ids_of`) split into batches of ``batch_size`` samples."""
        if isinstance(calibration, Mapping):
            calibration = token_ids_of(calibration)
        if (
            not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0
            or calibration.is_floating_point()
        ):
            found = (
                f"{tuple(calibration.shape)} {calibration.dtype}" if isinstance(calibration, torch.Tensor)
                else type(calibration).__name__
            )
            raise ValueError(f"calibration: expected a non-empty (samples, seq_len) tensor of token ids, got {found}")
        device = model_device(self.model)
        return [batch.to(device) for batch in calibration.split(check_batch_size(batch_size))]

    def stage_inputs(self, batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[StageCall]]:
        """Run the model up to the first block for every batch; its hidden input and call args."""
        hidden: list[torch.Tensor] = []
        calls: list[StageCall] = []

        def catch(_module, args, kwargs):
            if args:
                hidden.append(args[0].detach())
                rest = args[1:]
            else:
                hidden.append(kwargs.pop("hidden_states").detach())
                rest = ()
            calls.append(StageCall(rest, dict(kwargs)))
            raise _Stop

        handle = self.blocks()[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for ids in batches:
                inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                if self.causal_lm:
                    inputs["use_cache"] = False
                with contextlib.suppress(_Stop):
                    self.model(**inputs)
        finally:
            handle.remove()
        return hidden, calls

    # ---------------------------------------------------------------- dimensions (save / reload)
    def block_dims(self, block: nn.Module) -> dict[str, int]:
        """Per-block dimensions: kept attention groups and MLP neurons."""
        return {
            "attention_groups": self.attention(block, "").num_groups,
            "mlp_neurons": self.mlp(block, "").num_groups,
        }

    def dims(self) -> list[dict[str, int]]:
        """Dimensions of every block, for the saved metadata."""
        return [self.block_dims(block) for block in self.blocks()]

    def config_fields(self, attention_groups: int, mlp_neurons: int) -> dict[str, int] | None:
        """Config fields under which the family's stock class builds every block with these widths,
        or None when its config cannot say so (here: a pruned head count, since the head size is
        derived from ``hidden_size / heads``)."""
        if attention_groups != int(getattr(self.config, self.heads_field)):
            return None
        return {self.mlp_size_field: mlp_neurons}

    def config_kinds(self) -> set[str]:
        """The structure kinds whose pruned width, the same in every block, the family's config can
        state (so stock classes rebuild it): MLP neurons always, heads / KV groups only where the
        config has a head size of its own."""
        block = self.blocks()[0]
        attention, mlp = self.attention(block, ""), self.mlp(block, "")
        kinds = {mlp.kind}
        if self.config_fields(max(attention.num_groups - 1, 1), mlp.num_groups) is not None:
            kinds.add(attention.kind)
        return kinds

    def stock_config_fields(self) -> dict[str, int] | None:
        """The config fields that describe the model as it is now (pruned), or None when stock
        ``from_pretrained`` cannot rebuild it: widths that differ between blocks, an emptied
        structure, or widths the family's config cannot express (:meth:`config_fields`)."""
        dims = self.dims()
        if any(entry != dims[0] for entry in dims) or min(dims[0].values()) < 1:
            return None
        return self.config_fields(**dims[0])

    def sync_config(self) -> bool:
        """Write :meth:`stock_config_fields` into ``model.config`` so it describes the pruned model
        (``model.save_pretrained`` then reloads with stock classes); False, and the config left
        dense, when the config cannot express the pruned widths."""
        fields = self.stock_config_fields()
        if fields is None:
            return False
        for name, value in fields.items():
            setattr(self.config, name, value)
        return True

    def restore_dims(self, dims: list[dict[str, Any]]) -> None:
        """Shrink a freshly built dense model to saved per-block ``dims`` (values are reloaded after).

        Every entry is checked before anything is resized: one ``{"attention_groups": a,
        "mlp_neurons": n}`` per block, each an integer from 1 to the model's current (dense) width;
        anything else is a ValueError (nothing is allocated for a width the dense model lacks)."""
        from osscar_opt.formulations.surgery import resize_empty

        blocks = self.blocks()
        if not isinstance(dims, list) or len(dims) != len(blocks):
            saved = f"{len(dims)} blocks" if isinstance(dims, list) else f"a {type(dims).__name__}"
            raise ValueError(f"dims: {saved} saved, model has {len(blocks)} blocks")
        keys = ("attention_groups", "mlp_neurons")
        for index, (block, entry) in enumerate(zip(blocks, dims, strict=True)):
            if not isinstance(entry, Mapping) or set(entry) != set(keys):
                raise ValueError(f"dims: block {index} must be {{'attention_groups': int, 'mlp_neurons': int}}, "
                                 f"got {entry!r}")
            dense = {"attention_groups": self.attention(block, "").num_groups,
                     "mlp_neurons": self.mlp(block, "").num_groups}
            for key in keys:
                value = entry[key]
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= dense[key]:
                    raise ValueError(f"dims: block {index} {key} = {value!r}; expected an integer from 1 to "
                                     f"{dense[key]} (the dense model's width)")
        for block, entry in zip(blocks, dims, strict=True):
            structures = {"attention_groups": self.attention(block, ""), "mlp_neurons": self.mlp(block, "")}
            for key, structure in structures.items():
                if entry[key] != structure.num_groups:
                    resize_empty(structure, entry[key])
