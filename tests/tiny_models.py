"""Small models of every family behind one interface, for the tests that hold for all of them.

``MODELS`` names four tiny random transformers (:mod:`tests.tiny_transformers`) and two cheap
torchvision networks; :func:`build`, :func:`calibration`, :func:`output` and :func:`budgets` take
such a name, so one test body runs on every family.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from osscar_opt.budget import KINDS
from tests.tiny_transformers import FAMILIES, output_of, tiny_model, token_ids

VISION = ("resnet50", "mobilenet_v2")
MODELS = (*FAMILIES, *VISION)


def small_vision_model(architecture: str, seed: int = 0) -> nn.Module:
    """Stock torchvision models made cheap: narrow bottlenecks / width, BN statistics randomized."""
    torch.manual_seed(seed)
    if architecture == "mobilenet_v2":
        model = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=5)
    elif architecture == "resnet50":
        model = torchvision.models.resnet50(width_per_group=8, num_classes=5)
    else:
        model = torchvision.models.get_model(architecture, weights=None, num_classes=5)
    for module in model.modules():  # non-trivial BN so that eval mode is not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def is_vision(name: str) -> bool:
    return name not in FAMILIES


def build(name: str, seed: int = 0) -> nn.Module:
    """The tiny model ``name`` (one of :data:`MODELS`, or any torchvision architecture), in eval mode."""
    return small_vision_model(name, seed) if is_vision(name) else tiny_model(name, seed)


def images(samples: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def calibration(name: str, seed: int = 1) -> torch.Tensor:
    """Calibration data for ``name``: 6 random 32x32 images, or 12 sequences of 10 token ids."""
    return images(seed=seed) if is_vision(name) else token_ids(seed=seed)


@torch.no_grad()
def output(model: nn.Module, data: torch.Tensor) -> torch.Tensor:
    """Logits of a vision model; last hidden state (encoders) or logits (causal LMs) of a transformer."""
    if data.is_floating_point():
        return model(data)
    return output_of(model, data)


def budgets(name: str, sparsity: float) -> dict[str, float]:
    """The same sparsity for every structure kind the family has."""
    if is_vision(name):
        return {"channels": sparsity}
    return {"heads": sparsity, "kv_groups": sparsity, "neurons": sparsity}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class KeepEverything:
    """A :class:`osscar_opt.budget.Budget` that keeps every group of every structure."""

    def keep(self, name: str, kind: str, num_groups: int) -> int:
        return num_groups

    def kinds(self) -> set[str]:
        return set(KINDS)
