"""OPT family (OPTModel, OPTForCausalLM): heads of the self-attention, MLP neurons.

Block ``decoder.layers.i``: heads are input groups of ``self_attn.out_proj`` with producers
``self_attn.{q,k,v}_proj``; neurons are input columns of ``fc2`` with producer ``fc1``.
"""

from __future__ import annotations

from torch import nn

from osscar_opt.adapters.base import size_setter
from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.formulations.attention import head_structure
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Structure


class OptAdapter(TransformerAdapter):
    family = "opt"
    model_types = ("opt",)
    causal_lm = True
    mlp_size_field = "ffn_dim"

    def blocks(self) -> list[nn.Module]:
        return list(self.model.base_model.decoder.layers)

    def attention(self, block: nn.Module, prefix: str) -> Structure:
        attention = block.self_attn
        return head_structure(
            f"{prefix}.self_attn.out_proj",
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.out_proj,
            int(attention.head_dim),
            size_setter(attention, num_heads=1),
        )

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        return neuron_structure(f"{prefix}.fc2", [block.fc1], block.fc2)
