"""Emptied sublayers: what a whole attention layer or MLP becomes when it keeps no group.

With no group kept, a structure's consumer reads no input column: the sublayer's output is its
consumer's bias (the re-fit bias: the mean target on the calibration rows), or zero. Surgery
(:func:`osscar_opt.formulations.surgery.apply_solution` with an empty support) calls the
structure's ``on_empty``, which the family's adapter builds from :func:`replace_sublayer`: the
sublayer module is replaced by an :class:`EmptySublayer` in its block, and the norms that fed only
it (or that only normalize its zero output) by ``nn.Identity``, so their parameters are gone from
the model and from a saved folder. The block's own forward code runs unchanged: it still adds the
sublayer's (constant) output to the residual stream, which costs one addition of a broadcast
vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class EmptySublayer(nn.Module):
    """A sublayer that keeps no group: its output is ``bias`` (or zero), broadcast to its input's shape.

    Attributes:
        bias: ``(hidden,)`` parameter, or None for zero.
        attention: True for an attention layer: the forward returns ``(output, None)`` as attention
            modules do and, given a ``past_key_values`` cache, appends key / value states with no
            head to it (``(batch, 0, positions, head_dim)``), so that the cache still counts this
            layer's positions during generation.
        head_dim: the head size of those empty key / value states.
        layer_idx: the layer's index in the cache.
    """

    def __init__(self, hidden: int, bias: torch.Tensor | None = None, *, attention: bool = False,
                 head_dim: int = 0, layer_idx: int | None = None) -> None:
        super().__init__()
        self.hidden = int(hidden)
        self.attention = bool(attention)
        self.head_dim = int(head_dim)
        self.layer_idx = layer_idx
        if bias is not None:
            if tuple(bias.shape) != (self.hidden,):
                raise ValueError(f"bias: expected shape ({self.hidden},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None:
            raise ValueError("EmptySublayer: called without hidden states")
        output = torch.zeros_like(hidden)
        if self.bias is not None:
            output = output + self.bias.to(output.dtype)
        if not self.attention:
            return output
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        if cache is not None and hasattr(cache, "update") and self.layer_idx is not None:
            batch, positions = hidden.shape[0], hidden.shape[-2]
            empty = hidden.new_zeros((batch, 0, positions, self.head_dim))
            cache.update(empty, empty.clone(), self.layer_idx, {"cache_position": kwargs.get("cache_position")})
        return output, None

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, bias={self.bias is not None}, attention={self.attention}"


def is_empty(module: nn.Module | None) -> bool:
    """True for a sublayer that was emptied (:class:`EmptySublayer`)."""
    return isinstance(module, EmptySublayer)


def replace_sublayer(block: nn.Module, name: str, *, hidden: int, pre_norms: Sequence[str] = (),
                     post_norms: Sequence[str] = (), attention: bool = False, head_dim: int = 0,
                     layer_idx: int | None = None) -> Callable[[torch.Tensor | None], None]:
    """``on_empty`` for a structure: replace ``block.<name>`` by an :class:`EmptySublayer` (output
    ``bias``, or zero) and the block's norms around it by ``nn.Identity``.

    ``pre_norms`` feed only this sublayer (their output is unused once it is empty): always
    replaced. ``post_norms`` normalize only its output: replaced when that output is zero (no bias;
    a norm of zero is zero), kept when it is a constant bias."""

    def empty(bias: torch.Tensor | None) -> None:
        setattr(block, name, EmptySublayer(hidden, bias, attention=attention, head_dim=head_dim,
                                           layer_idx=layer_idx))
        for norm in [*pre_norms, *(post_norms if bias is None else ())]:
            if isinstance(getattr(block, norm, None), nn.Module):
                setattr(block, norm, nn.Identity())

    return empty
