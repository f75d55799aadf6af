"""MPNet family (MPNetModel; all-mpnet-base-v2, the most used sentence encoder): MLP neurons only.

Block ``encoder.layer.i``: neurons are input columns of ``output.dense`` with producer
``intermediate.dense``. Heads are not a structure: MPNet adds a relative position bias with one
entry per head, computed once by the encoder from ``encoder.relative_attention_bias`` (an embedding
of ``heads`` columns shared by every block) and passed to every block, so a block cannot lose heads
on its own. Uniform MLP widths reload with the stock class (``intermediate_size``).
"""

from __future__ import annotations

from torch import nn

from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Structure


class MPNetAdapter(TransformerAdapter):
    family = "mpnet"
    model_types = ("mpnet",)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.base_model.encoder.layer)

    def attention(self, block: nn.Module, prefix: str) -> Structure | None:
        return None  # the per-head relative position bias is shared by all blocks

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        return neuron_structure(f"{prefix}.output.dense", [block.intermediate.dense], block.output.dense)
