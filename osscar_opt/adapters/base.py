"""The interface between the pipeline and one model family (docs/architecture.md, "Adapters").

An adapter says what the *stages* of a model are (the pieces run in sequence during calibration:
transformer blocks, residual blocks, a stem), which prunable
:class:`~osscar_opt.formulations.structures.Structure` each stage holds, how calibration data
becomes the first stage's inputs and how a stage is called. The pipeline
(:mod:`osscar_opt.pipeline`) does everything else, the same way for every family; it never
branches on model names. One file per family; :mod:`osscar_opt.adapters.registry` lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from osscar_opt.formulations.structures import Structure


def _no_structures(_module: nn.Module) -> list[Structure]:
    return []


@dataclass
class Stage:
    """A piece of the network run in sequence during calibration.

    Attributes:
        name: the stage's path in the model (``"encoder.layer.0"``, ``"layer1.0"``, ``"stem"``).
        module: maps the previous stage's output (and the per-batch call arguments) to this stage's output.
        structures: given ``module`` or a deep copy of it, that module's prunable structures in
            pruning order (names are qualified in the model); re-derived after every cut.
    """

    name: str
    module: nn.Module
    structures: Callable[[nn.Module], list[Structure]] = _no_structures


@dataclass
class StageCall:
    """The extra positional and keyword arguments a model passes to its stages for one batch."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> StageCall:
        """This call with every tensor in its arguments on ``device`` (see :func:`to_device`)."""
        return to_device(self, device)


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it: a tensor, a :class:`StageCall`, or
    tuples, lists and dicts of them (nested); anything else (None, flags, cache objects) is
    returned as it is. Containers are rebuilt only when a tensor in them changed, so with an
    ``fn`` that returns its argument (``t.to(device)`` on the tensor's own device) the result is
    ``value`` itself."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, StageCall):
        args, kwargs = map_tensors(value.args, fn), map_tensors(value.kwargs, fn)
        return value if args is value.args and kwargs is value.kwargs else StageCall(args, kwargs)
    if isinstance(value, tuple | list):
        items = [map_tensors(item, fn) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        items = {key: map_tensors(item, fn) for key, item in value.items()}
        return value if all(items[key] is item for key, item in value.items()) else items
    return value


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` (a tensor, a :class:`StageCall`, or tuples, lists and dicts of them) with every
    tensor moved to ``device``; the cached stage inputs and call arguments of an offloaded prune
    are moved this way between the offload and the compute device."""
    return map_tensors(value, lambda tensor: tensor.to(device))


def size_setter(module: nn.Module, **per_group: int) -> Callable[[int], None]:
    """``on_resize`` for a structure: after surgery sets ``module.<name> = keep * per_group[name]``.

    E.g. ``size_setter(attention, num_heads=1, split_size=head_dim)`` for GPT-2 attention.
    """

    def resize(keep: int) -> None:
        for name, unit in per_group.items():
            setattr(module, name, keep * unit)

    return resize


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def first_output(output: Any) -> torch.Tensor:
    """The hidden state of a stage's output (transformers blocks may return tuples)."""
    return output[0] if isinstance(output, tuple | list) else output


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return batch_size


class ModelAdapter:
    """Base class of the model-family adapters.

    Subclasses set ``family`` and implement :meth:`handles`, :meth:`stages`,
    :meth:`calibration_batches` and :meth:`stage_inputs`.
    """

    family: ClassVar[str] = ""
    adds_bias: ClassVar[bool] = False
    """Whether a bias-free consumer may gain a re-fit bias (``refit_bias``): only where the saved
    model records it (torchvision shape records do; a transformers config's bias flags do not)."""
    default_target: ClassVar[str] = "pruned-input"
    """The calibration target :func:`osscar_opt.pipeline.prune` uses when none is given (measured
    per family in the README: transformers gain from ``pruned-input``; MobileNetV2 collapses with
    it and needs ``dense-output``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """True when this adapter understands ``model``."""
        raise NotImplementedError

    @property
    def architecture(self) -> str:
        """A short name of the model's architecture for reports (the family by default)."""
        return self.family

    def stages(self) -> list[Stage]:
        """The stages in forward order."""
        raise NotImplementedError

    def calibration_batches(self, calibration: Any, batch_size: int) -> list[torch.Tensor]:
        """Validate ``calibration`` and split it into batches (on the model's device)."""
        raise NotImplementedError

    def stage_inputs(self, batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[StageCall]]:
        """The first stage's input and call arguments for every batch."""
        raise NotImplementedError

    def run_stage(self, stage: Stage, hidden: torch.Tensor, call: StageCall, module: nn.Module | None = None):
        """Output of ``stage`` (or of ``module``, a copy of it) on one batch."""
        return first_output((module or stage.module)(hidden, *call.args, **call.kwargs))

    def sync_config(self) -> bool:
        """After pruning: make the model's own configuration describe its pruned widths, where it has
        one that can; True when it now does (stock classes rebuild the model from it)."""
        return False

    def structures(self) -> list[Structure]:
        """Every prunable structure of the model, in pruning order."""
        return [structure for stage in self.stages() for structure in stage.structures(stage.module)]

    def outside_stages(self) -> list[nn.Module]:
        """The model's modules that belong to no stage (embeddings, final norm, head, pooling): under
        ``offload`` their own parameters and buffers move to the compute device while
        :meth:`stage_inputs` runs, and back after."""
        inside = {id(module) for stage in self.stages() for module in stage.module.modules()}
        return [module for module in self.model.modules() if id(module) not in inside]

    def qualified_name(self, module: nn.Module) -> str:
        """The name of ``module`` inside the model."""
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise ValueError(f"model: {type(module).__name__} is not a submodule of the model")
