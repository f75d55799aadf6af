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


LAYER_CALLS = "osscar_layer_calls"
"""Key of a :class:`StageCall`'s keyword arguments holding the call arguments of every layer type."""


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

    @property
    def architecture(self) -> str:
        """The model's ``config.model_type`` (the family's name when it has none)."""
        return str(getattr(self.config, "model_type", None) or self.family)

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """True when ``model`` is a transformers model of one of ``model_types``."""
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in cls.model_types

    # ---------------------------------------------------------------- family specifics
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in forward order."""
        raise NotImplementedError

    def attention(self, block: nn.Module, prefix: str) -> Structure | None:
        """The attention structure (heads, or KV groups for GQA) of ``block``; None where the
        family's attention cannot lose heads exactly (a norm over all heads at once)."""
        raise NotImplementedError

    def query_heads(self, block: nn.Module, prefix: str) -> Structure | None:
        """The ``q_heads`` structure of ``block`` (query heads inside each KV group), or None where
        the model has no GQA (one query head per key-value head)."""
        return None

    def mlp(self, block: nn.Module, prefix: str) -> Structure | None:
        """The MLP neuron structure of ``block`` (None once the MLP was emptied)."""
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
            found = [self.attention(block, prefix), self.query_heads(block, prefix), self.mlp(block, prefix)]
            return [structure for structure in found if structure is not None]

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

    def model_inputs(self, batch: torch.Tensor) -> dict[str, Any]:
        """The keyword arguments of the model's forward for one calibration batch (token ids, all attended)."""
        inputs = {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
        if self.causal_lm:
            inputs["use_cache"] = False
        return inputs

    def layer_types(self) -> list[str] | None:
        """``config.layer_types`` (one per block) when the blocks are of several types (sliding-window
        and global attention: Gemma 2/3, Qwen3, SmolLM3), else None."""
        types = getattr(self.config, "layer_types", None)
        blocks = self.blocks()
        if not isinstance(types, list | tuple) or len(set(types)) < 2 or len(types) < len(blocks):
            return None
        return [str(kind) for kind in types[:len(blocks)]]

    def stage_inputs(self, batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[StageCall]]:
        """Run the model up to the first block for every batch; its hidden input and call args.

        Where the blocks are of several types (:meth:`layer_types`), the model passes each type
        its own mask and position embeddings (Gemma 3: a local and a global rotary base): the
        forward pass then runs on to the first block of every type, whose call arguments go into
        the batch's :class:`StageCall` under :data:`LAYER_CALLS`; :meth:`run_stage` gives each block
        those of its type."""
        hidden: list[torch.Tensor] = []
        calls: list[StageCall] = []
        blocks = self.blocks()
        types = self.layer_types()
        firsts: dict[str, int] = {}
        for index, kind in enumerate(types or []):
            firsts.setdefault(kind, index)
        last = max(firsts.values(), default=0)
        variants: dict[str, dict[str, Any]] = {}

        def catcher(index: int, kinds: list[str]):
            def catch(_module, args, kwargs):
                kwargs = dict(kwargs)
                if index == 0:
                    hidden.append((args[0] if args else kwargs.pop("hidden_states")).detach())
                else:
                    kwargs.pop("hidden_states", None)
                rest = args[1:] if args else ()
                for kind in kinds:
                    variants[kind] = {"args": rest, "kwargs": kwargs}
                if index == 0:
                    calls.append(StageCall(rest, dict(kwargs)))
                if index == last:
                    raise _Stop

            return catch

        indices = sorted(set(firsts.values()) | {0})
        handles = [blocks[index].register_forward_pre_hook(
            catcher(index, [kind for kind, first in firsts.items() if first == index]), with_kwargs=True)
            for index in indices]
        try:
            for ids in batches:
                inputs = self.model_inputs(ids)
                variants = {}
                with contextlib.suppress(_Stop):
                    self.model(**inputs)
                if types is not None:
                    calls[-1].kwargs[LAYER_CALLS] = dict(variants)
        finally:
            for handle in handles:
                handle.remove()
        return hidden, calls

    def run_stage(self, stage: Stage, hidden: torch.Tensor, call: StageCall, module: nn.Module | None = None):
        """As :meth:`ModelAdapter.run_stage`, with the call arguments of the stage's layer type."""
        variants = call.kwargs.get(LAYER_CALLS)
        if variants is not None:
            kind = self.layer_types()[self._block_index(stage.name)]
            call = StageCall(variants[kind]["args"], variants[kind]["kwargs"])
        return super().run_stage(stage, hidden, call, module)

    def _block_index(self, name: str) -> int:
        indices = getattr(self, "_indices", None)
        if indices is None:
            indices = self._indices = {self.qualified_name(block): i for i, block in enumerate(self.blocks())}
        if name not in indices:
            raise ValueError(f"stage: {name!r} is not a block of the model")
        return indices[name]

    # ---------------------------------------------------------------- dimensions (save / reload)
    def _dim_structures(self, block: nn.Module) -> dict[str, Structure]:
        """The block's structures by the name of the width they set (``attention_groups``,
        ``query_heads`` per KV group, ``mlp_neurons``), in pruning order."""
        found = {"attention_groups": self.attention(block, ""), "query_heads": self.query_heads(block, ""),
                 "mlp_neurons": self.mlp(block, "")}
        return {key: structure for key, structure in found.items() if structure is not None}

    def empty_dims(self, block: nn.Module) -> dict[str, int]:
        """The widths of ``block``'s emptied sublayers (0 each, :mod:`~osscar_opt.formulations.empty`),
        by the keys of :meth:`block_dims`; none in families whose sublayers cannot be emptied."""
        return {}

    def block_dims(self, block: nn.Module) -> dict[str, int]:
        """Per-block widths: kept attention groups, query heads per KV group (GQA), MLP neurons (0
        for an emptied sublayer)."""
        return {**self.empty_dims(block),
                **{key: structure.budget_groups for key, structure in self._dim_structures(block).items()}}

    def dims(self) -> list[dict[str, int]]:
        """Dimensions of every block, for the saved metadata."""
        return [self.block_dims(block) for block in self.blocks()]

    def config_fields(self, dims: Mapping[str, int]) -> dict[str, int] | None:
        """Config fields under which the family's stock class builds every block with widths ``dims``
        (one block's :meth:`block_dims`), or None when its config cannot say so (here: a pruned head
        count, since the head size is derived from ``hidden_size / heads``)."""
        heads = dims.get("attention_groups")
        if heads is not None and heads != int(getattr(self.config, self.heads_field)):
            return None
        return {self.mlp_size_field: dims["mlp_neurons"]}

    def config_kinds(self) -> set[str]:
        """The structure kinds whose pruned width, the same in every block, the family's config can
        state (so stock classes rebuild it): MLP neurons always, heads / KV groups / query heads
        only where the config has a head size of its own."""
        structures = self._dim_structures(self.blocks()[0])
        dense = {key: structure.budget_groups for key, structure in structures.items()}
        kinds = set()
        for key, structure in structures.items():
            if self.config_fields({**dense, key: max(structure.budget_groups - 1, 1)}) is not None:
                kinds.add(structure.kind)
        return kinds

    def stock_config_fields(self) -> dict[str, int] | None:
        """The config fields that describe the model as it is now (pruned), or None when stock
        ``from_pretrained`` cannot rebuild it: widths that differ between blocks, an emptied
        structure, widths the family's config cannot express (:meth:`config_fields`), or fields
        under which the stock class (built on the meta device) would not have the pruned model's
        parameter shapes."""
        dims = self.dims()
        if any(entry != dims[0] for entry in dims) or min(dims[0].values()) < 1:
            return None
        fields = self.config_fields(dims[0])
        if fields is None or not self._builds_pruned_shapes(fields):
            return None
        return fields

    def _builds_pruned_shapes(self, fields: Mapping[str, int]) -> bool:
        """True when the model's class on its config with ``fields`` has exactly the pruned parameter shapes."""
        import copy

        config = copy.deepcopy(self.config)
        for name, value in fields.items():
            setattr(config, name, value)
        with torch.device("meta"):
            twin = type(self.model)(config)
        shapes = {name: tuple(p.shape) for name, p in twin.named_parameters(remove_duplicate=False)}
        return shapes == {name: tuple(p.shape) for name, p in self.model.named_parameters(remove_duplicate=False)}

    def remote_code_rebuilds(self) -> bool:
        """Whether the saved folder's remote-code module (:mod:`osscar_opt.io.remote_code`, which sets
        parameter shapes and numeric module attributes) rebuilds the model as it is now; where not
        (an emptied sublayer is a module of another class), the folder reloads with
        :func:`osscar_opt.load_pruned` only."""
        return not any(self.empty_dims(block) for block in self.blocks())

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

        Every entry is checked before anything is resized: one mapping per block with the dense
        block's keys (:meth:`block_dims`; ``query_heads`` may be missing in folders saved before
        that kind existed, and then stays dense), each an integer from 1 to the model's current
        (dense) width; anything else is a ValueError (nothing is allocated for a width the dense
        model lacks). A width of 0 (an emptied sublayer) is accepted where the family can empty that
        structure (and for the query heads of an emptied attention). Widths are restored in pruning
        order (KV groups before query heads)."""
        from osscar_opt.formulations import surgery

        blocks = self.blocks()
        if not isinstance(dims, list) or len(dims) != len(blocks):
            saved = f"{len(dims)} blocks" if isinstance(dims, list) else f"a {type(dims).__name__}"
            raise ValueError(f"dims: {saved} saved, model has {len(blocks)} blocks")
        for index, (block, entry) in enumerate(zip(blocks, dims, strict=True)):
            dense = self.block_dims(block)
            required = set(dense) - {"query_heads"}
            if not isinstance(entry, Mapping) or not required <= set(entry) <= set(dense):
                raise ValueError(f"dims: block {index} must be {{{', '.join(f'{k!r}: int' for k in dense)}}}, "
                                 f"got {entry!r}")
            structures = self._dim_structures(block)
            for key, value in entry.items():
                emptiable = structures[key].can_empty or (key == "query_heads" and entry.get("attention_groups") == 0)
                lowest = 0 if emptiable else 1
                if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= dense[key]:
                    raise ValueError(f"dims: block {index} {key} = {value!r}; expected an integer from {lowest} to "
                                     f"{dense[key]} (the dense model's width)")
        for block, entry in zip(blocks, dims, strict=True):
            for key in self.block_dims(block):
                structure = self._dim_structures(block).get(key)  # re-derived: KV groups change the query heads'
                if structure is not None and key in entry and entry[key] != structure.budget_groups:
                    surgery.resize_empty(structure, entry[key])
