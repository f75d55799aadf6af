"""Save / reload family ``"torchvision"``: pruned ResNets and MobileNetV2 with their new shapes.

``export`` records the architecture name, the number of classes and the shape of every Conv2d,
BatchNorm2d and Linear (so any pruned width, and any ``width_mult``, is rebuilt exactly);
``rebuild`` builds the stock torchvision model, replaces those modules by ones of the recorded
shapes and loads the safetensors state dict (no pickle). Where the stock class's own arguments can
state the pruned widths (MobileNetV2: one ``inverted_residual_setting`` row per block), ``meta``
also holds ``"stock": {"class": "torchvision.models.MobileNetV2", "kwargs": {...}}``: that class,
called with those arguments, loads ``model.safetensors`` strictly, without osscar_opt.
``osscar_opt.io`` (``save_pruned`` / ``load_pruned``) does the atomic write and dispatches on the
family name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from osscar_opt.adapters.convnet import ConvNetAdapter
from osscar_opt.adapters.registry import adapter_for, vision_architectures


def _adapter(model: nn.Module) -> ConvNetAdapter | None:
    try:
        adapter = adapter_for(model)
    except ValueError:
        return None
    return adapter if isinstance(adapter, ConvNetAdapter) else None


def handles(model: nn.Module) -> bool:
    """True for a model the vision adapters support (torchvision ResNet 18/34/50/101, MobileNetV2)."""
    return _adapter(model) is not None


def module_shape(module: nn.Module) -> dict[str, Any] | None:
    """The shape record of a Conv2d / BatchNorm2d / Linear, else None."""
    if isinstance(module, nn.Conv2d):
        return {
            "type": "conv2d",
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "groups": module.groups,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.BatchNorm2d):
        return {"type": "batchnorm2d", "num_features": module.num_features}
    if isinstance(module, nn.Linear):
        return {
            "type": "linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    return None


def shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Shape records of every Conv2d, BatchNorm2d and Linear of ``model``, by module path."""
    return {name: shape for name, module in model.named_modules() if (shape := module_shape(module)) is not None}


def export(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, state_dict)`` of a supported model; tensors are detached, contiguous CPU copies."""
    adapter = _adapter(model)
    if adapter is None:
        raise ValueError(f"model: {type(model).__name__} is not a supported torchvision architecture")
    layer_shapes = shapes(model)
    classifier = [shape for shape in layer_shapes.values() if shape["type"] == "linear"][-1]
    meta = {
        "architecture": adapter.architecture,
        "num_classes": classifier["out_features"],
        "internal_channels": adapter.internal_channels(),
        "modules": layer_shapes,
        "torchvision_version": torchvision.__version__,
    }
    stock = adapter.stock_constructor()
    if stock is not None:
        meta["stock"] = {"class": f"torchvision.models.{stock[0]}", "kwargs": stock[1]}
    if hasattr(adapter, "constructor"):  # sizes without a torchvision name (vision_transformer)
        name, kwargs = adapter.constructor()
        meta["constructor"] = {"class": name, "kwargs": kwargs}
    state = {key: value.detach().to("cpu").contiguous().clone() for key, value in model.state_dict().items()}
    return meta, state


def _resized(module: nn.Module, shape: Mapping[str, Any], path: str) -> nn.Module:
    """A fresh module like ``module`` with the recorded ``shape`` (parameters re-initialized)."""
    kind = shape.get("type")
    if kind == "conv2d" and isinstance(module, nn.Conv2d):
        return nn.Conv2d(
            int(shape["in_channels"]), int(shape["out_channels"]), module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=int(shape["groups"]),
            bias=bool(shape["bias"]), padding_mode=module.padding_mode,
        )
    if kind == "batchnorm2d" and isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(
            int(shape["num_features"]), eps=module.eps, momentum=module.momentum, affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
    if kind == "linear" and isinstance(module, nn.Linear):
        return nn.Linear(int(shape["in_features"]), int(shape["out_features"]), bias=bool(shape["bias"]))
    raise ValueError(f"meta: module {path} is a {type(module).__name__}, the record says {kind!r}")


def resize(model: nn.Module, layer_shapes: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Replace every recorded module of ``model`` (in place) by one of the recorded shape."""
    present = shapes(model)
    if set(present) != set(layer_shapes):
        missing = sorted(set(present) ^ set(layer_shapes))[:5]
        raise ValueError(f"meta: recorded modules do not match the stock architecture (e.g. {missing})")
    for path, shape in layer_shapes.items():
        if present[path] == dict(shape):
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, _resized(getattr(parent, child), shape, path))
    refresh_residual_flags(model)
    return model


def refresh_residual_flags(model: nn.Module) -> None:
    """Recompute MobileNetV2's ``use_res_connect`` after a resize (it depends on the width:
    a block adds its input when its stride is 1 and it keeps the channel count)."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    for block in model.modules():
        if isinstance(block, InvertedResidual):
            convs = [module for module in block.conv.modules() if isinstance(module, nn.Conv2d)]
            stride = max(max(conv.stride) for conv in convs)
            block.use_res_connect = stride == 1 and convs[0].in_channels == convs[-1].out_channels
            block.out_channels = convs[-1].out_channels


def build(meta: Mapping[str, Any]) -> nn.Module:
    """The stock architecture of ``meta`` resized to its recorded module shapes (weights not loaded)."""
    architecture = meta.get("architecture")
    if architecture not in vision_architectures():
        raise ValueError(f"meta: architecture {architecture!r} is not one of {', '.join(vision_architectures())}")
    modules = meta.get("modules")
    if not isinstance(modules, Mapping):
        raise ValueError("meta: missing the 'modules' shape records")
    constructor = meta.get("constructor")
    if isinstance(constructor, Mapping):
        model = _constructed(constructor)
    else:
        model = torchvision.models.get_model(architecture, weights=None, num_classes=int(meta["num_classes"]))
    return resize(model, modules)


CONSTRUCTORS = ("VisionTransformer",)
"""torchvision classes a saved ``constructor`` record may name (integer arguments only)."""


def _constructed(record: Mapping[str, Any]) -> nn.Module:
    """The torchvision class of a ``constructor`` record called with its integer arguments."""
    name, kwargs = record.get("class"), record.get("kwargs")
    if name not in CONSTRUCTORS or not isinstance(kwargs, Mapping) or not all(
            isinstance(value, int) and not isinstance(value, bool) for value in kwargs.values()):
        raise ValueError(f"meta: constructor {dict(record)!r} is not one of {list(CONSTRUCTORS)} with integer "
                         "arguments")
    return getattr(torchvision.models, name)(**kwargs)


def write_files(model: nn.Module, directory: Path) -> None:
    """Nothing beyond the weights and the shape records."""


def rebuild(meta: Mapping[str, Any], state: dict[str, torch.Tensor], directory: str | Path) -> nn.Module:
    """Rebuild a model saved by ``osscar_opt.save_pruned`` from its ``meta`` and weights, in eval mode."""
    model = build(meta)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"directory: weights in {directory} do not match the recorded shapes ({exc})") from exc
    return model.eval()


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Resize a stock ``model`` to the shapes implied by ``state`` (e.g. a pruned checkpoint) and
    load it. Depthwise convs are recognized by their single input channel per group."""
    layer_shapes = shapes(model)
    for path, shape in layer_shapes.items():
        weight = state.get(f"{path}.weight")
        if weight is None:
            continue
        if shape["type"] == "conv2d":
            depthwise = shape["groups"] > 1 and weight.shape[1] == 1
            shape.update(
                out_channels=int(weight.shape[0]),
                groups=int(weight.shape[0]) if depthwise else shape["groups"],
                in_channels=int(weight.shape[0]) if depthwise else int(weight.shape[1]) * shape["groups"],
                bias=f"{path}.bias" in state,
            )
        elif shape["type"] == "batchnorm2d":
            shape.update(num_features=int(weight.shape[0]))
        else:
            shape.update(
                out_features=int(weight.shape[0]), in_features=int(weight.shape[1]), bias=f"{path}.bias" in state
            )
    resize(model, layer_shapes)
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights: do not fit the {type(model).__name__} architecture ({exc})") from exc
    return model


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file or a torch checkpoint (``weights_only=True``, no pickle
    code execution); a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights: no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ValueError(f"weights: cannot read {path} as safetensors or a torch state dict ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights: {path} does not hold a state dict of tensors")
    return dict(state)


def model_from_weights(architecture: str, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A stock ``architecture`` sized to the checkpoint (classes, widths, pruned channels) and loaded."""
    classifier = [key for key, value in state.items() if key.endswith(".weight") and value.dim() == 2]
    if not classifier:
        raise ValueError("weights: no classifier (2-D weight) in the checkpoint")
    num_classes = int(state[classifier[-1]].shape[0])
    model = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
    return load_weights(model, state).eval()


def load_images(path: str | Path) -> torch.Tensor:
    """Calibration images ``(N, 3, H, W)`` from a safetensors file (key ``images``) or a torch tensor
    file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calibration_images: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        images = load_file(str(path)).get("images")
    else:
        images = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"calibration_images: {path} must hold a (N, C, H, W) tensor (key 'images')")
    return images.float()
