"""Save/reload family "transformers": stock transformers classes with per-block dimensions.

``export`` records the model class (``transformers.<ClassName>``), the adapter family and the
kept attention groups / MLP neurons of every block; ``write_files`` writes ``config.json`` (the
dense configuration); ``rebuild`` instantiates the class from that config, shrinks every block to
the saved dimensions and loads the weights strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from osscar_opt.adapters.registry import adapter_for
from osscar_opt.adapters.transformer import TransformerAdapter


def handles(model: nn.Module) -> bool:
    """True for transformers models of a supported architecture."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if not isinstance(model, PreTrainedModel):
        return False
    # unsupported architectures raise a ValueError listing the supported ones
    return isinstance(adapter_for(model), TransformerAdapter)


def export(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, state_dict)``: class name, adapter family, per-block dims and the weights."""
    adapter = adapter_for(model)
    meta = {
        "class": type(model).__name__,
        "adapter": adapter.family,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "blocks": adapter.dims(),
    }
    return meta, dict(model.state_dict())


def write_files(model: nn.Module, directory: Path) -> None:
    """Write the model's ``config.json`` (and generation config when there is one)."""
    model.config.save_pretrained(str(directory))
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(str(directory))


def rebuild(meta: dict[str, Any], state: dict[str, torch.Tensor], directory: Path) -> nn.Module:
    """The saved model as its original transformers class, in eval mode."""
    import transformers

    cls = getattr(transformers, str(meta.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"directory: {directory} names an unknown transformers class {meta.get('class')!r}")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    dtype = getattr(torch, str(meta.get("dtype", "float32")))
    model = cls(config).to(dtype)
    adapter_for(model).restore_dims(meta["blocks"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"directory: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
