"""ModernBERT family (ModernBertModel and its task heads): fused ``Wqkv`` heads, GLU MLP neurons.

Block ``layers.i``: heads are input groups of ``attn.Wo``; the producer is the fused ``attn.Wqkv``
(query | key | value, viewed as ``(3, -1 heads, d)``), cut by rows in place and kept fused. Neurons
are input columns of ``mlp.Wo``; the producer ``mlp.Wi`` holds input | gate (split by
``chunk(2)``), neuron ``i`` owning row ``i`` of each half. Local (sliding-window) and global layers
are pruned alike; each is calibrated with its own layer type's mask and rotary embeddings. The head
size is ``hidden_size / heads`` in the config, so pruned heads reload with ``trust_remote_code`` /
``load_pruned`` and uniform MLP widths with the stock class (``intermediate_size``).
"""

from __future__ import annotations

from torch import nn

from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.formulations.attention import fused_head_structure
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Producer, Structure


class ModernBertAdapter(TransformerAdapter):
    family = "modernbert"
    model_types = ("modernbert",)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.base_model.layers)

    def attention(self, block: nn.Module, prefix: str) -> Structure:
        attention = block.attn
        return fused_head_structure(f"{prefix}.attn.Wo", attention.Wqkv, attention.Wo, int(attention.head_dim))

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        mlp = block.mlp
        width = mlp.Wo.in_features
        if mlp.Wi.out_features != 2 * width:
            raise ValueError(f"model: {prefix}.mlp.Wi has {mlp.Wi.out_features} outputs, expected 2 x {width}")
        structure = neuron_structure(f"{prefix}.mlp.Wo", [], mlp.Wo)
        structure.producers = [Producer(mlp.Wi, [[i, width + i] for i in range(width)], segments=2)]
        return structure
