"""BERT layout (BERT, RoBERTa, XLM-RoBERTa and their task heads): heads of the self-attention, MLP neurons.

Block ``encoder.layer.i``: heads are input groups of ``attention.output.dense`` with producers
``attention.self.{query,key,value}``; neurons are input columns of ``output.dense`` with producer
``intermediate.dense``.
"""

from __future__ import annotations

from torch import nn

from osscar_opt.adapters.base import size_setter
from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.formulations.attention import head_structure
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Structure


class BertAdapter(TransformerAdapter):
    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta")

    def blocks(self) -> list[nn.Module]:
        return list(self.model.base_model.encoder.layer)

    def attention(self, block: nn.Module, prefix: str) -> Structure:
        self_attention = block.attention.self
        head_size = int(self_attention.attention_head_size)
        return head_structure(
            f"{prefix}.attention.output.dense",
            self_attention.query,
            self_attention.key,
            self_attention.value,
            block.attention.output.dense,
            head_size,
            size_setter(self_attention, num_attention_heads=1, all_head_size=head_size),
        )

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        return neuron_structure(f"{prefix}.output.dense", [block.intermediate.dense], block.output.dense)
