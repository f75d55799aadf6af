"""Prune the internal channels of torchvision ResNets and MobileNetV2 (one shot, sequential).

Pipeline per residual block, in network order (DESIGN.md, "Solutions back into the network"):

1. run the block on the *pruned* network's block inputs and the *dense* network's block inputs;
   the consumer conv's unfolded inputs come from the pruned run, its targets from the dense run;
2. build the layer problem (one group per internal channel), solve it with the chosen backend for
   a uniform share of kept channels, write the re-fit weights into the consumer and drop the
   pruned channels from the producers (convs, depthwise conv, BatchNorm entries);
3. advance both block-input caches through the block and move on.

``prune_vision`` is the Python API; ``run_prune`` is what ``osscar prune --model resnet18 ...``
calls.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osscar_opt.adapters import mobilenet, resnet
from osscar_opt.adapters.channels import (
    ChannelUnit,
    Stage,
    check_unit,
    keep_producers,
    set_consumer,
    unit_channels,
)
from osscar_opt.formulations.conv import ConvStatistics, conv_weight
from osscar_opt.solving import solve

FAMILIES = (resnet, mobilenet)
SUPPORTED: tuple[str, ...] = tuple(name for family in FAMILIES for name in family.ARCHITECTURES)


# ---------------------------------------------------------------------------------------- checks
def identify(model: nn.Module) -> tuple[str, Any]:
    """``(architecture name, adapter module)`` for a supported torchvision model, else ValueError."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for family in FAMILIES:
        name = family.architecture(model)
        if name is not None:
            return name, family
    raise ValueError(
        f"model: {type(model).__name__} is not a supported torchvision architecture; "
        f"supported: {', '.join(SUPPORTED)}"
    )


def check_sparsity(channels_sparsity: float) -> float:
    """Validate the share of internal channels to remove: a number in ``[0, 1)``."""
    if isinstance(channels_sparsity, bool) or not isinstance(channels_sparsity, int | float):
        raise ValueError(f"channels_sparsity: expected a number in [0, 1), got {channels_sparsity!r}")
    value = float(channels_sparsity)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"channels_sparsity: expected a number in [0, 1), got {channels_sparsity!r}")
    return value


def channels_to_keep(channels: int, channels_sparsity: float) -> int:
    """Kept channels of a unit with ``channels`` channels: ``channels - round(sparsity * channels)``,
    at least one."""
    return max(1, channels - int(round(channels_sparsity * channels)))


def calibration_batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Split calibration images ``(N, C, H, W)`` (or an iterable of such batches) into batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if isinstance(images, torch.Tensor):
        batches = list(images.split(batch_size))
    else:
        try:
            batches = [torch.as_tensor(batch) for batch in images]
        except TypeError as exc:
            raise ValueError("calibration_images: expected a tensor (N, C, H, W) or batches of them") from exc
    if not batches:
        raise ValueError("calibration_images: no images given")
    for batch in batches:
        if batch.dim() != 4 or not batch.is_floating_point() or batch.shape[0] == 0:
            raise ValueError(
                f"calibration_images: expected float batches of shape (N, C, H, W), got {tuple(batch.shape)} "
                f"{batch.dtype}"
            )
        if not torch.isfinite(batch).all():
            raise ValueError("calibration_images: contains NaN or Inf values")
    return batches


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def internal_channels(model: nn.Module) -> dict[str, int]:
    """Channels of every prunable unit of a supported model: ``{"layer1.0.conv2": 64, ...}``."""
    _, family = identify(model)
    return {
        f"{stage.name}.{unit.consumer}": unit_channels(stage.module, unit)
        for stage in family.stages(model)
        for unit in stage.units
    }


# ------------------------------------------------------------------------------------ calibration
@torch.no_grad()
def _statistics(
    dense: Stage, pruned: Stage, unit: ChannelUnit, inputs: list[torch.Tensor], targets: list[torch.Tensor]
) -> ConvStatistics:
    """Stream the unit's consumer statistics: inputs from the pruned stage, targets from the dense one."""
    consumer = pruned.module.get_submodule(unit.consumer)
    stats = ConvStatistics(consumer, targets=True)
    captured: dict[str, torch.Tensor] = {}

    def keep_output(_module, _args, output):
        captured["y"] = output.detach().clone()

    def add_input(_module, args):
        stats.add(args[0], captured.pop("y"))

    hooks = [
        dense.module.get_submodule(unit.consumer).register_forward_hook(keep_output),
        consumer.register_forward_pre_hook(add_input),
    ]
    try:
        for x_pruned, x_dense in zip(inputs, targets, strict=True):
            dense.module(x_dense)
            pruned.module(x_pruned)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def _layer_report(name: str, problem, solution, channels: int, calibration_seconds: float) -> dict[str, Any]:
    full_loss = problem.loss(range(problem.num_groups))
    return {
        "layer": name,
        "channels": channels,
        "kept": len(solution.support),
        "kept_channels": list(solution.support),
        "loss": solution.loss,
        "loss_all_kept": full_loss,
        "relative_loss": solution.loss / problem.c0 if problem.c0 > 0 else 0.0,
        "seconds": solution.seconds,
        "calibration_seconds": calibration_seconds,
        "backend": solution.backend,
    }


def _prune_unit(
    dense: Stage,
    pruned: Stage,
    unit: ChannelUnit,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Calibrate, solve and apply one channel unit; returns its report entry."""
    check_unit(pruned.module, unit)
    name = f"{pruned.name}.{unit.consumer}"
    start = time.perf_counter()
    stats = _statistics(dense, pruned, unit, inputs, targets)
    problem = stats.problem(damp=settings["damp"], refit_bias=settings["refit_bias"], meta={"layer": name})
    calibration_seconds = time.perf_counter() - start
    if settings["save_problems"] is not None:
        problem.save(Path(settings["save_problems"]) / f"{name}.safetensors")
    channels = problem.num_groups
    keep = channels_to_keep(channels, settings["sparsity"])
    solution = solve(problem, keep, backend=settings["backend"], **settings["backend_options"])
    kept = torch.tensor(solution.support, dtype=torch.int64)
    consumer = pruned.module.get_submodule(unit.consumer)
    set_consumer(consumer, conv_weight(solution.weights, consumer, kept), solution.bias)
    keep_producers(pruned.module, unit, kept)
    return _layer_report(name, problem, solution, channels, calibration_seconds)


@torch.no_grad()
def _advance(stage: Stage, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [stage.module(batch) for batch in batches]


# ---------------------------------------------------------------------------------------- API
def prune_vision(
    model: nn.Module,
    calibration_images: torch.Tensor | Iterable[torch.Tensor],
    channels_sparsity: float,
    backend: str = "local-search",
    backend_options: Mapping[str, Any] | None = None,
    damp: float = 1e-2,
    *,
    batch_size: int = 32,
    refit_bias: bool = False,
    device: torch.device | str | None = None,
    save_problems: str | Path | None = None,
    verbose: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove ``channels_sparsity`` of the internal channels of every block, one shot.

    Args:
        model: a torchvision ResNet (18/34/50/101) or MobileNetV2; it is not modified.
        calibration_images: ``(N, 3, H, W)`` float images, normalized as the model expects, or an
            iterable of such batches.
        channels_sparsity: share of internal channels removed from every unit, in ``[0, 1)``.
        backend: a registered backend name (``local-search``, ``greedy``, ``activation``, ...).
        backend_options: keyword options passed to the backend.
        damp: ridge weight relative to the mean input energy (``lam = damp * mean(diag(X^T X))``).
        batch_size: calibration batch size when ``calibration_images`` is one tensor.
        refit_bias: also re-fit a bias for every consumer conv (adds a bias to bias-free convs).
        device: where calibration and solving run (default: the model's device).
        save_problems: folder to write every layer problem into (``<layer>.safetensors``).
        verbose: print one line per pruned unit.

    Returns:
        ``(pruned_model, report)``: a pruned deep copy in eval mode, and a JSON-ready report with
        one entry per unit (layer, channels, kept, loss, seconds, ...).
    """
    architecture, family = identify(model)
    sparsity = check_sparsity(channels_sparsity)
    if backend_options is not None and not isinstance(backend_options, Mapping):
        raise ValueError(f"backend_options: expected a mapping of option names to values, got {backend_options!r}")
    device = torch.device(device) if device is not None else model_device(model)
    batches = [batch.to(device) for batch in calibration_batches(calibration_images, batch_size)]
    if save_problems is not None:
        Path(save_problems).mkdir(parents=True, exist_ok=True)
    settings = {
        "damp": damp,
        "refit_bias": bool(refit_bias),
        "save_problems": save_problems,
        "sparsity": sparsity,
        "backend": backend,
        "backend_options": dict(backend_options or {}),
    }
    start = time.perf_counter()
    dense = copy.deepcopy(model).to(device).eval()
    pruned = copy.deepcopy(model).to(device).eval()
    channels_before = internal_channels(pruned)
    layers: list[dict[str, Any]] = []
    inputs, targets = batches, batches
    for dense_stage, pruned_stage in zip(family.stages(dense), family.stages(pruned), strict=True):
        for unit in pruned_stage.units:
            entry = _prune_unit(dense_stage, pruned_stage, unit, inputs, targets, settings)
            layers.append(entry)
            if verbose:
                print(
                    f"{entry['layer']}: kept {entry['kept']}/{entry['channels']} channels, "
                    f"loss {entry['loss']:.4g}, {entry['seconds']:.2f}s"
                )
        inputs, targets = _advance(pruned_stage, inputs), _advance(dense_stage, targets)
    report = {
        "architecture": architecture,
        "backend": backend,
        "backend_options": {key: repr(value) for key, value in settings["backend_options"].items()},
        "channels_sparsity": sparsity,
        "damp": damp,
        "refit_bias": bool(refit_bias),
        "calibration_images": sum(batch.shape[0] for batch in batches),
        "channels_before": sum(channels_before.values()),
        "channels_after": sum(internal_channels(pruned).values()),
        "seconds": time.perf_counter() - start,
        "layers": layers,
    }
    return pruned, report


# ---------------------------------------------------------------------------------------- CLI
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
    import torchvision

    from osscar_opt.adapters.torchvision_io import load_weights

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


def run_prune(args: Any) -> int:
    """``osscar prune --model <torchvision name>``: prune, report, optionally save.

    Without ``--weights`` the model is first trained on the digits data set (a few CPU minutes at
    most); with ``--weights PATH`` it is loaded from the checkpoint. Calibration images come from
    ``--calibration-images PATH`` when given, else from the digits training split. The digits test
    accuracy before and after pruning is reported when the model has 10 classes.
    """
    from osscar_opt import vision_data

    architecture = getattr(args, "model", None)
    if architecture not in SUPPORTED:
        raise ValueError(f"model: expected one of {', '.join(SUPPORTED)}, got {architecture!r}")
    sparsity = getattr(args, "channels_sparsity", None)
    if sparsity is None:
        raise ValueError("channels_sparsity: required for vision models (--channels-sparsity, in [0, 1))")
    sparsity = check_sparsity(sparsity)
    samples = int(getattr(args, "samples", None) or 128)
    batch_size = int(getattr(args, "batch_size", None) or 32)
    device = torch.device(getattr(args, "device", None) or "cpu")
    weights = getattr(args, "weights", None)
    recipe = vision_data.TRAINING_DEFAULTS.get(architecture, vision_data.DEFAULT_TRAINING)
    image_size = getattr(args, "image_size", None) or (224 if weights else recipe["image_size"])
    info: dict[str, Any] = {}
    if weights:
        model = model_from_weights(architecture, load_state_dict(weights)).to(device)
    else:
        epochs = int(getattr(args, "epochs", None) or 6)
        print(f"no --weights: training {architecture} on the digits data set for {epochs} epochs ...")
        model, _, _, trained = vision_data.digits_model(
            architecture, image_size=image_size, epochs=epochs, device=device
        )
        info["train_seconds"] = trained["train_seconds"]
    images_path = getattr(args, "calibration_images", None)
    train_split, test_split = vision_data.digits(image_size=image_size)
    calibration = load_images(images_path) if images_path else train_split.images
    calibration = calibration[:samples]
    pruned, report = prune_vision(
        model, calibration, sparsity, backend=getattr(args, "backend", None) or "local-search",
        backend_options=_backend_options(getattr(args, "backend_option", None)),
        damp=float(getattr(args, "damp", None) or 1e-2), batch_size=batch_size,
        refit_bias=bool(getattr(args, "refit_bias", False)), device=device,
        save_problems=getattr(args, "save_problems", None), verbose=True,
    )
    report.update(info)
    if _num_classes(model) == vision_data.NUM_CLASSES:
        report["digits_accuracy_dense"] = vision_data.accuracy(model, test_split)
        report["digits_accuracy_pruned"] = vision_data.accuracy(pruned, test_split)
    report["parameters_dense"] = sum(p.numel() for p in model.parameters())
    report["parameters_pruned"] = sum(p.numel() for p in pruned.parameters())
    _print_summary(report)
    _write_outputs(pruned, report, getattr(args, "output", None), getattr(args, "report", None))
    return 0


def _backend_options(items: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``--backend-option key=value`` strings (parsed as the other commands do) or a mapping."""
    from osscar_opt.commands.options import parse_backend_options

    return dict(items) if isinstance(items, Mapping) else parse_backend_options(items)


def _num_classes(model: nn.Module) -> int:
    return [module for module in model.modules() if isinstance(module, nn.Linear)][-1].out_features


def _print_summary(report: Mapping[str, Any]) -> None:
    line = (
        f"{report['architecture']}: {report['channels_before']} -> {report['channels_after']} internal channels, "
        f"{report['parameters_dense']} -> {report['parameters_pruned']} parameters, "
        f"backend {report['backend']}, {report['seconds']:.1f}s"
    )
    if "digits_accuracy_pruned" in report:
        line += (
            f"; digits test accuracy {100 * report['digits_accuracy_dense']:.1f}% -> "
            f"{100 * report['digits_accuracy_pruned']:.1f}%"
        )
    print(line)


def _write_outputs(model: nn.Module, report: Mapping[str, Any], output: str | None, report_path: str | None) -> None:
    import json

    if output:
        from osscar_opt.io import save_pruned

        save_pruned(model, output)
        print(f"saved the pruned model to {output}")
    if report_path:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(report, indent=1))
        print(f"wrote the report to {report_path}")
