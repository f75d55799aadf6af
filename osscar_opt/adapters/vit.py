"""Hugging Face vision transformers (ViT, DeiT and their classifiers): heads and MLP neurons.

Block ``layers.i``: heads are input groups of ``attention.o_proj`` with producers
``attention.{q,k,v}_proj`` (the forward reshapes with ``-1`` heads); neurons are input columns of
``mlp.fc2`` with producer ``mlp.fc1``. The class token, patch embedding, position embeddings and
the classifier are never cut. Calibration data is a float ``(images, channels, height, width)``
tensor of pixel values (normalized as the model expects), split into batches; the model runs up
to its first block as for the text families. The attention reads ``head_dim`` from the config, so
uniform widths (heads too) reload with the stock class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from osscar_opt.adapters.base import check_batch_size, model_device, size_setter
from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.formulations.attention import head_structure
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Structure


class ViTAdapter(TransformerAdapter):
    family = "vit"
    model_types = ("vit", "deit")

    def blocks(self) -> list[nn.Module]:
        return list(self.model.base_model.layers)

    def attention(self, block: nn.Module, prefix: str) -> Structure:
        attention = block.attention
        return head_structure(
            f"{prefix}.attention.o_proj", attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
            int(attention.head_dim), size_setter(attention, num_attention_heads=1),
        )

    def mlp(self, block: nn.Module, prefix: str) -> Structure:
        return neuron_structure(f"{prefix}.mlp.fc2", [block.mlp.fc1], block.mlp.fc2)

    def calibration_batches(self, calibration: Any, batch_size: int) -> list[torch.Tensor]:
        """``(images, channels, height, width)`` float pixel values split into batches of ``batch_size``."""
        channels, size = int(self.config.num_channels), self.config.image_size
        if (
            not isinstance(calibration, torch.Tensor) or calibration.dim() != 4 or calibration.numel() == 0
            or not calibration.is_floating_point() or calibration.shape[1] != channels
        ):
            found = (f"{tuple(calibration.shape)} {calibration.dtype}" if isinstance(calibration, torch.Tensor)
                     else type(calibration).__name__)
            raise ValueError(f"calibration: expected a non-empty float (images, {channels}, {size}, {size}) tensor of "
                             f"pixel values, got {found}")
        device, dtype = model_device(self.model), next(self.model.parameters()).dtype
        return [batch.to(device, dtype) for batch in calibration.split(check_batch_size(batch_size))]

    def model_inputs(self, batch: torch.Tensor) -> dict[str, Any]:
        return {"pixel_values": batch}

    def config_fields(self, dims) -> dict[str, int] | None:
        head_dim = int(self.blocks()[0].attention.head_dim)
        return {"num_attention_heads": dims["attention_groups"], "head_dim": head_dim,
                self.mlp_size_field: dims["mlp_neurons"]}
