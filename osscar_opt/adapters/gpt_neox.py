"""GPT-NeoX family (Pythia, GPT-NeoX-20B): fused query_key_value interleaved per head, MLP neurons.

Block ``layers.i``: heads are input groups of ``attention.dense``; the producer is the fused
``attention.query_key_value``, whose ``3 * d`` consecutive rows per head are ``q_h | k_h | v_h``
(the forward reshapes its output to ``(-1 heads, 3 * d)`` and chunks it), so a head's rows are one
contiguous block and the module stays fused. Neurons are input columns of ``mlp.dense_4h_to_h``
with producer ``mlp.dense_h_to_4h``. The head size is ``hidden_size / heads`` in the config, so
pruned heads reload with ``trust_remote_code`` / ``load_pruned``; uniform MLP widths with the
stock class (``intermediate_size``).
"""

from __future__ import annotations

from torch import nn

from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.formulations.attention import interleaved_head_structure
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Structure


class GptNeoXAdapter(TransformerAdapter):
    family = "gpt_neox"
    model_types = ("gpt_neox",)
    causal_lm = True

    def blocks(self) -> list[nn.Module]:
        return list(self.model.base_model.layers)

    def attention(self, block: nn.Module, prefix: str) -> Structure:
        attention = block.attention
        return interleaved_head_structure(f"{prefix}.attention.dense", attention.query_key_value, attention.dense,
                                          int(attention.head_size))

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        return neuron_structure(f"{prefix}.mlp.dense_4h_to_h", [block.mlp.dense_h_to_4h], block.mlp.dense_4h_to_h)
