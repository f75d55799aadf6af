"""LLaMA family (LlamaForCausalLM and modules that match it: Qwen2, Mistral): GQA KV groups, SwiGLU.

Block ``layers.i``: one attention group is one key-value head with all its query heads (input
columns of ``self_attn.o_proj``; rows of ``q_proj`` for those query heads and of ``k_proj`` /
``v_proj`` for that KV head; with ``num_key_value_heads == num_attention_heads`` this is plain
heads). Neurons are input columns of ``mlp.down_proj`` with producers ``mlp.gate_proj`` and
``mlp.up_proj``. The forward code reshapes with ``-1`` heads, so only ``intermediate_size`` needs
updating. The config has ``head_dim``, ``num_attention_heads`` and ``num_key_value_heads``, so
uniform widths are written into the config and reload with the stock class.
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

    def config_fields(self, attention_groups: int, mlp_neurons: int) -> dict[str, int] | None:
        """Heads, KV heads and head size are config fields: any uniform width is expressible."""
        attention = self.blocks()[0].self_attn
        queries_per_group = int(attention.num_key_value_groups)
        return {
            "num_attention_heads": attention_groups * queries_per_group,
            "num_key_value_heads": attention_groups,
            "head_dim": int(attention.head_dim),
            self.mlp_size_field: mlp_neurons,
        }
