"""LLaMA family (LlamaForCausalLM and modules that match it: Qwen2, Mistral): GQA KV groups, SwiGLU.

Block ``layers.i``: one attention group is one key-value head with all its query heads (input
columns of ``self_attn.o_proj``; rows of ``q_proj`` for those query heads and of ``k_proj`` /
``v_proj`` for that KV head; with ``num_key_value_heads == num_attention_heads`` this is plain
heads). Neurons are input columns of ``mlp.down_proj`` with producers ``mlp.gate_proj`` and
``mlp.up_proj``. The forward code reshapes with ``-1`` heads, so only ``intermediate_size`` needs
updating.
"""

from __future__ import annotations

from torch import nn

from osscar_opt.adapters.base import size_setter
from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.formulations.attention import kv_group_structure
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Structure


class LlamaAdapter(TransformerAdapter):
    family = "llama"
    model_types = ("llama", "qwen2", "mistral")
    causal_lm = True

    def blocks(self) -> list[nn.Module]:
        return list(self.model.base_model.layers)

    def attention(self, block: nn.Module, prefix: str) -> Structure:
        attention = block.self_attn
        return kv_group_structure(
            f"{prefix}.self_attn.o_proj",
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.o_proj,
            int(attention.head_dim),
        )

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        mlp = block.mlp
        resize = size_setter(mlp, intermediate_size=1)
        return neuron_structure(f"{prefix}.mlp.down_proj", [mlp.gate_proj, mlp.up_proj], mlp.down_proj, resize)
