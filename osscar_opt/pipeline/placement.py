"""Where a prune runs: the compute device the stages run on, and (with offload) the device the model
and the cached activations live on between uses.

With ``offload=True`` the model and the cached activations (stage inputs, call arguments, dense
targets) stay on the offload device (where the model is, normally the CPU); each stage moves to
the compute device just for its own passes, solves and cuts, and goes back pruned; the cached
tensors move to the compute device one batch at a time, when used.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from osscar_opt.adapters.base import ModelAdapter, map_tensors, model_device


class Placement:
    """Where the stages run (``compute``) and where the model and the cached activations live
    (``storage``, the offload device) during a prune.

    Without ``offload`` every method returns its argument (everything stays where the model is).
    With it, :meth:`stage_on_compute` holds one stage on the compute device, :meth:`fetch` brings a
    cached tensor (or a :class:`~osscar_opt.adapters.base.StageCall`) there for one use and
    :meth:`store` puts a result back on the offload device. Tensors and modules move through
    :meth:`_to_compute` / :meth:`_to_storage` only (``tensor.to(device)``; modules through
    ``Module._apply``, as ``Module.to`` does).
    """

    def __init__(self, compute: torch.device, storage: torch.device, offload: bool) -> None:
        self.compute = compute
        self.storage = storage
        self.offload = offload

    @classmethod
    def local(cls) -> Placement:
        """Everything on the CPU, nothing moved."""
        return cls(torch.device("cpu"), torch.device("cpu"), False)

    def _to_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.compute)

    def _to_storage(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.storage)

    def fetch(self, value: Any) -> Any:
        """``value`` (a tensor, a StageCall, tuples / lists / dicts of them) on the compute device."""
        return map_tensors(value, self._to_compute) if self.offload else value

    def store(self, value: Any) -> Any:
        """``value`` on the offload device."""
        return map_tensors(value, self._to_storage) if self.offload else value

    @contextlib.contextmanager
    def stage_on_compute(self, module: nn.Module, back: bool = True):
        """``module`` (a stage, cut in place inside the block) on the compute device; on leaving,
        back on the offload device (also after an error); ``back=False`` for a throw-away copy."""
        if not self.offload:
            yield module
            return
        module._apply(self._to_compute)
        try:
            yield module
        finally:
            if back:
                module._apply(self._to_storage)

    @contextlib.contextmanager
    def outside_stages_on_compute(self, adapter: ModelAdapter):
        """The parameters and buffers of no stage (embeddings, masks' buffers, head) on the compute
        device, for :meth:`ModelAdapter.stage_inputs`; back on the offload device after."""
        if not self.offload:
            yield
            return
        modules = adapter.outside_stages()
        for module in modules:
            module._apply(self._to_compute, recurse=False)
        try:
            yield
        finally:
            for module in modules:
                module._apply(self._to_storage, recurse=False)


def resolve_device(value: Any, name: str = "device") -> torch.device:
    """``value`` (a ``torch.device`` or a name such as ``"cuda:0"``) as a device this machine has,
    with the CUDA index made explicit; anything else is a ValueError naming ``name``."""
    shown = repr(str(value)) if isinstance(value, torch.device) else repr(value)
    if isinstance(value, str):
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError(f"{name}: {shown} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    elif isinstance(value, torch.device):
        device = value
    else:
        raise ValueError(f"{name}: expected a torch.device or a device name such as 'cuda:0', got "
                         f"{type(value).__name__} {shown}")
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "meta":
        raise ValueError(f"{name}: {shown} holds no data; expected a device such as 'cpu' or 'cuda'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {shown}: no CUDA GPU is available on this machine; use 'cpu'")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {shown}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             "numbered from 0")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: {shown}: MPS is not available on this machine; use 'cpu'")
    return device


def placement_for(model: nn.Module, device: Any, offload: Any) -> Placement:
    """Check ``offload`` and ``device`` (before any work) and say where things go: the offload
    device is the model's; the compute device ``device`` (default: the model's)."""
    if not isinstance(offload, bool):
        raise ValueError(f"offload: expected True or False, got {offload!r}")
    storage = resolve_device(model_device(model), "model")
    compute = storage if device is None else resolve_device(device)
    if not offload and compute != storage:
        raise ValueError(
            f"device: the model is on {storage} and offload is off, so prune runs where the model is; move the "
            f"model first (model.to({str(compute)!r})) or pass offload=True to keep it on {storage} and move one "
            f"stage at a time to {compute}"
        )
    return Placement(compute, storage, offload)
