"""torchvision VisionTransformer (vit_b_16 ... vit_h_14, or any size): the hidden units of every
encoder block's MLP.

Block ``encoder.layers.encoder_layer_i``: ``ln_1 -> self_attention -> + -> ln_2 -> mlp`` with
``mlp = Linear(hidden, mlp_dim) -> GELU -> Dropout -> Linear(mlp_dim, hidden)``. The ``mlp_dim``
hidden units are the structure (kind ``channels``, like every torchvision unit): input columns of
``mlp.3`` with producer ``mlp.0``. Heads are not a structure: ``nn.MultiheadAttention`` ties its
inner width to its input width (``embed_dim``; ``F.multi_head_attention_forward`` checks it and
splits it into ``num_heads`` equal heads), so a head cannot be cut in place from the stock module.

The first stage's inputs are the token sequences the encoder blocks see (patch embedding, class
token and position embedding computed here from the images). Sizes other than the five torchvision
names are architecture ``vision_transformer`` and are saved with their constructor arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from osscar_opt.adapters.base import Stage, StageCall
from osscar_opt.adapters.convnet import ConvNetAdapter
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Structure

NAMED: dict[tuple[int, int, int], str] = {
    (16, 768, 12): "vit_b_16", (32, 768, 12): "vit_b_32", (16, 1024, 24): "vit_l_16", (32, 1024, 24): "vit_l_32",
    (14, 1280, 32): "vit_h_14",
}
CUSTOM = "vision_transformer"
ARCHITECTURES: tuple[str, ...] = (*NAMED.values(), CUSTOM)


def block_structure(block: nn.Module, prefix: str) -> Structure:
    """The MLP hidden units of one encoder block (kind ``channels``)."""
    structure = neuron_structure(f"{prefix}.mlp.3", [block.mlp[0]], block.mlp[3])
    structure.kind = "channels"
    return structure


class TorchvisionViTAdapter(ConvNetAdapter):
    family = "torchvision_vit"
    architectures = ARCHITECTURES
    default_target = "pruned-input"  # a transformer: the transformers families' default

    @classmethod
    def architecture_of(cls, model: nn.Module) -> str | None:
        if not isinstance(model, VisionTransformer):
            return None
        return NAMED.get((int(model.patch_size), int(model.hidden_dim), len(model.encoder.layers)), CUSTOM)

    def stages(self) -> list[Stage]:
        stages = []
        for name, block in self.model.encoder.layers.named_children():
            prefix = f"encoder.layers.{name}"
            stages.append(Stage(prefix, block, lambda module, prefix=prefix: [block_structure(module, prefix)]))
        return stages

    def stage_inputs(self, batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[StageCall]]:
        """The token sequences the first encoder block sees: patches, class token, position embedding."""
        model, hidden = self.model, []
        with torch.no_grad():
            for images in batches:
                tokens = model._process_input(images)
                tokens = torch.cat([model.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
                hidden.append(model.encoder.dropout(tokens + model.encoder.pos_embedding))
        return hidden, [StageCall() for _ in batches]

    def constructor(self) -> tuple[str, dict[str, Any]]:
        """``(torchvision class, keyword arguments)`` building this architecture (MLP widths as in the
        first block; the saved shape records give every block its own)."""
        model = self.model
        return "VisionTransformer", {
            "image_size": int(model.image_size), "patch_size": int(model.patch_size),
            "num_layers": len(model.encoder.layers), "num_heads": int(model.encoder.layers[0].num_heads),
            "hidden_dim": int(model.hidden_dim), "mlp_dim": int(model.encoder.layers[0].mlp[0].out_features),
            "num_classes": int(model.heads[-1].out_features),
        }
