"""DistilBERT family (DistilBertModel and its task heads): heads of the self-attention, MLP neurons.

Block ``transformer.layer.i``: heads are input groups of ``attention.out_lin`` with producers
``attention.{q,k,v}_lin`` (the forward reshapes with ``-1`` heads; ``n_heads`` follows the cut);
neurons are input columns of ``ffn.lin2`` with producer ``ffn.lin1``. The head size is
``dim / n_heads`` in the config, so pruned heads reload with ``trust_remote_code`` / ``load_pruned``
and uniform MLP widths with the stock class (``hidden_dim``).
"""

from __future__ import annotations

from torch import nn

from osscar_opt.adapters.base import size_setter
from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.formulations.attention import head_structure
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Structure


class DistilBertAdapter(TransformerAdapter):
    family = "distilbert"
    model_types = ("distilbert",)
    mlp_size_field = "hidden_dim"
    heads_field = "n_heads"

    def blocks(self) -> list[nn.Module]:
        return list(self.model.base_model.transformer.layer)

    def attention(self, block: nn.Module, prefix: str) -> Structure:
        attention = block.attention
        return head_structure(
            f"{prefix}.attention.out_lin", attention.q_lin, attention.k_lin, attention.v_lin, attention.out_lin,
            int(attention.attention_head_size), size_setter(attention, n_heads=1),
        )

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        return neuron_structure(f"{prefix}.ffn.lin2", [block.ffn.lin1], block.ffn.lin2)
