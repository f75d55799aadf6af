"""GPT-2 family (GPT2Model, GPT2LMHeadModel): heads of the self-attention, MLP neurons.

GPT-2's linear layers are transformers' ``Conv1D`` (weight ``(in, out)``); structures read them as
``(out, in)`` and surgery writes ``Conv1D`` back, so the pruned model keeps stock modules.
Block ``h.i``: heads are input groups of ``attn.c_proj`` whose producer is the fused
``attn.c_attn`` (query | key | value, split by ``attn.split_size``); neurons are input columns of
``mlp.c_proj`` with producer ``mlp.c_fc``. After surgery ``num_heads`` and ``split_size`` follow
the kept heads (the forward code splits ``c_attn``'s output by ``split_size`` and reshapes with
``-1`` heads).
"""

from __future__ import annotations

from torch import nn

from osscar_opt.adapters.base import size_setter
from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.formulations.attention import fused_head_structure
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Structure


class Gpt2Adapter(TransformerAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    causal_lm = True
    mlp_size_field = "n_inner"
    heads_field = "n_head"

    def blocks(self) -> list[nn.Module]:
        return list(self.model.base_model.h)

    def attention(self, block: nn.Module, prefix: str) -> Structure:
        attention = block.attn
        if getattr(attention, "is_cross_attention", False):
            raise ValueError(f"model: {prefix}.attn is cross-attention, which is not supported")
        head_dim = int(attention.head_dim)
        return fused_head_structure(
            f"{prefix}.attn.c_proj", attention.c_attn, attention.c_proj, head_dim,
            size_setter(attention, num_heads=1, split_size=head_dim),
        )

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        return neuron_structure(f"{prefix}.mlp.c_proj", [block.mlp.c_fc], block.mlp.c_proj)
