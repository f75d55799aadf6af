"""Phi-3 layout (Phi-3, Phi-3.5, Phi-4): fused ``self_attn.qkv_proj`` and ``mlp.gate_up_proj``.

Recognized by structure: every block of ``model.base_model.layers`` has ``self_attn.{qkv_proj,
o_proj}`` and ``mlp.{gate_up_proj, down_proj}`` Linears. The fused projections are cut by rows in
place and stay fused, so the stock class runs and reloads them:

* KV groups: ``qkv_proj`` is ``heads * d`` query rows | ``kv_heads * d`` key rows | as many value
  rows; group ``j`` owns its ``r`` query heads' rows, key head ``j`` and value head ``j``
  (:func:`~osscar_opt.formulations.attention.fused_kv_group_structure`), kept in that layout;
* ``q_heads`` (GQA): query rows only, the key and value rows always kept after them;
* neurons: ``gate_up_proj`` is gate | up (split by ``chunk(2)``), neuron ``i`` owns row ``i`` of
  each half; ``down_proj`` column ``i``.

The stock forward splits ``qkv_proj``'s output at ``config.num_attention_heads * head_dim``, the
model's shared config: after a cut each attention gets its own copy of the config with its own
head counts (and ``num_key_value_heads`` / ``num_key_value_groups`` follow). Uniform widths are
written into the model's config and reload with the stock class. Per-block attention widths
cannot be rebuilt by the remote-code module (it sets numeric attributes, not a config per
attention): they reload with :func:`osscar_opt.load_pruned`; per-block MLP widths reload both ways.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from osscar_opt.adapters.decoder import decoder_blocks, head_dim_of, warn_unlisted
from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.formulations.attention import fused_kv_group_structure, query_head_structure
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Producer, Structure

LAYOUT = "self_attn.{qkv_proj,o_proj} + mlp.{gate_up_proj,down_proj}"


def has_phi3_layout(model: nn.Module) -> bool:
    """True when every decoder block has the fused Phi-3 projections as Linears."""
    blocks = decoder_blocks(model)

    def linears(module: nn.Module | None, names: tuple[str, ...]) -> bool:
        return module is not None and all(isinstance(getattr(module, name, None), nn.Linear) for name in names)

    return blocks is not None and all(
        linears(getattr(block, "self_attn", None), ("qkv_proj", "o_proj"))
        and linears(getattr(block, "mlp", None), ("gate_up_proj", "down_proj"))
        for block in blocks
    )


def own_config(attention: nn.Module, **fields: Any) -> None:
    """Give ``attention`` its own copy of its config with ``fields`` set (the forward reads head counts there)."""
    config = copy.copy(attention.config)
    for name, value in fields.items():
        setattr(config, name, value)
    attention.config = config


class Phi3Adapter(TransformerAdapter):
    family = "phi3"
    model_types = ("phi3",)
    causal_lm = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        warn_unlisted(self.config, self.model_types, "Phi-3", LAYOUT)

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return getattr(model, "config", None) is not None and has_phi3_layout(model)

    def blocks(self) -> list[nn.Module]:
        return decoder_blocks(self.model) or []

    def _heads(self, attention: nn.Module) -> tuple[int, int, int]:
        """``(head_dim, query heads, KV heads)`` of ``attention`` as its modules are now."""
        head_dim = head_dim_of(attention, self.config)
        heads = attention.o_proj.in_features // head_dim
        kv_heads = (attention.qkv_proj.out_features - attention.o_proj.in_features) // (2 * head_dim)
        return head_dim, heads, kv_heads

    def attention(self, block: nn.Module, prefix: str) -> Structure:
        attention = block.self_attn
        head_dim, heads, kv_heads = self._heads(attention)
        per_group = heads // kv_heads

        def resize(keep: int) -> None:
            attention.num_key_value_heads = keep
            own_config(attention, num_attention_heads=keep * per_group, num_key_value_heads=keep)

        return fused_kv_group_structure(f"{prefix}.self_attn.o_proj", attention.qkv_proj, attention.o_proj,
                                        head_dim, kv_heads, resize)

    def query_heads(self, block: nn.Module, prefix: str) -> Structure | None:
        heads = int(self.config.num_attention_heads)
        if int(getattr(self.config, "num_key_value_heads", None) or heads) >= heads:
            return None
        attention = block.self_attn
        head_dim, heads, kv_heads = self._heads(attention)
        width = heads * head_dim
        structure = query_head_structure(f"{prefix}.self_attn.o_proj:q_heads", attention.qkv_proj, attention.o_proj,
                                         head_dim, kv_heads)

        def resize(keep: int) -> None:
            attention.num_key_value_groups = keep // kv_heads
            own_config(attention, num_attention_heads=keep)

        structure.producers = [Producer(attention.qkv_proj, structure.groups,
                                        tail=list(range(width, width + 2 * kv_heads * head_dim)))]
        structure.on_resize = resize
        return structure

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        mlp = block.mlp
        width = mlp.down_proj.in_features
        structure = neuron_structure(f"{prefix}.mlp.down_proj", [], mlp.down_proj)
        structure.producers = [Producer(mlp.gate_up_proj, [[i, width + i] for i in range(width)], segments=2)]
        if mlp.gate_up_proj.out_features != 2 * width:
            raise ValueError(f"model: {prefix}.mlp.gate_up_proj has {mlp.gate_up_proj.out_features} outputs, "
                             f"expected 2 x {width}")
        return structure

    def config_fields(self, dims) -> dict[str, int] | None:
        head_dim, heads, kv_heads = self._heads(self.blocks()[0].self_attn)
        groups = dims.get("attention_groups", kv_heads)
        per_group = dims.get("query_heads", heads // kv_heads)
        return {"num_attention_heads": groups * per_group, "num_key_value_heads": groups, "head_dim": head_dim,
                self.mlp_size_field: dims["mlp_neurons"]}

    def remote_code_rebuilds(self) -> bool:
        """Only where every attention has the config's head counts (per-block MLP widths)."""
        heads, kv_heads = int(self.config.num_attention_heads), int(self.config.num_key_value_heads)
        return all(self._heads(block.self_attn)[1:] == (heads, kv_heads) for block in self.blocks())
