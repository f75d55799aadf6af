"""Conv channels: one input channel of a dense ``Conv2d`` consumer is one group.

The consumer's rows are unfolded patches (:func:`~osscar_opt.formulations.layers.unfold_inputs`),
so channel ``c`` owns the ``kh * kw`` columns ``c*kh*kw .. (c+1)*kh*kw - 1``. Its producers are
the modules that make the channel, in data order: the previous dense conv (loses output channel
``c``), BatchNorms (lose entry ``c``) and a depthwise conv in between (loses channel ``c``
entirely, with its group).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from osscar_opt.formulations.layers import check_conv_consumer, is_depthwise, kernel_area
from osscar_opt.formulations.structures import Producer, Structure, contiguous_groups


def channel_count(module: nn.Module) -> int | None:
    """Output channels of a conv producer, or entries of a BatchNorm (None for other modules)."""
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    if isinstance(module, nn.BatchNorm2d):
        return int(module.num_features)
    return None


def channel_structure(name: str, consumer: nn.Module, producers: Sequence[tuple[str, nn.Module]]) -> Structure:
    """Input channels of ``consumer`` as groups; ``producers`` are ``(name, module)`` pairs.

    Every producer must be a dense or depthwise ``Conv2d`` or a ``BatchNorm2d`` yielding exactly as
    many channels as the consumer reads.
    """
    conv = check_conv_consumer(consumer, name)
    channels = int(conv.in_channels)
    for path, module in producers:
        if isinstance(module, nn.Conv2d) and module.groups > 1 and not is_depthwise(module):
            raise ValueError(f"model: {path} is a grouped conv (groups={module.groups}), not supported as a producer")
        size = channel_count(module)
        if size is None:
            raise ValueError(f"model: {path} is a {type(module).__name__}, expected Conv2d or BatchNorm2d")
        if size != channels:
            raise ValueError(f"model: {path} has {size} channels but its consumer {name} reads {channels}")
    rows = [[c] for c in range(channels)]
    return Structure(
        name, "channels", conv, contiguous_groups(channels, kernel_area(conv)),
        [Producer(module, rows) for _, module in producers],
    )
