"""BERT family (BertModel and its task heads): heads of the self-attention, MLP neurons.

Block ``encoder.layer.i``: heads are input groups of ``attention.output.dense`` with producers
``attention.self.{query,key,value}``; neurons are input columns of ``output.dense`` with producer
``intermediate.dense``.
"""

from __future__ import annotations

from torch import nn

from osscar_opt.adapters.base import ModelAdapter
from osscar_opt.formulations.attention import head_structure
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Structure


def _set_heads(attention: nn.Module, head_size: int):
    def resize(keep: int) -> None:
        attention.num_attention_heads = keep
        attention.all_head_size = keep * head_size

    return resize


class BertAdapter(ModelAdapter):
    family = "bert"
    model_types = ("bert",)

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
            _set_heads(self_attention, head_size),
        )

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        return neuron_structure(f"{prefix}.output.dense", [block.intermediate.dense], block.output.dense)
