"""Stock ``from_pretrained(folder, trust_remote_code=True)`` for pruned widths a config cannot state.

Where the family's config cannot describe the pruned model (widths that differ between blocks,
BERT's pruned heads), the saved folder gets a small Python module, :data:`MODULE_FILE`, and
``config.json`` an ``auto_map`` naming its classes, so that transformers itself (no osscar_opt
installed) rebuilds the model:

* ``config.json`` stays the dense model's config; its ``osscar_pruned`` record adds the shape of
  every parameter pruning changed (``shapes``) and the numeric attributes of every module that
  changed with them (``attributes``: head counts, widths), both found by comparing the pruned
  model with the dense architecture built on the meta device (:func:`record`);
* the module's model class subclasses the family's stock class: it builds the dense model, gives
  those parameters their recorded shapes and sets those attributes; the weights then load as
  usual. Nothing in it depends on the family beyond the two class names.

Without ``trust_remote_code=True`` transformers refuses the folder and says to pass it (the
module runs code from the folder); :func:`osscar_opt.load_pruned` reads the same folder without it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MODULE_FILE = "osscar_pruned_modeling.py"
MODULE_NAME = MODULE_FILE.removesuffix(".py")
AUTO_MAPPINGS = (("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
                 ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
                 ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
                 ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
                 ("AutoModel", "MODEL_MAPPING_NAMES"))
"""The Auto classes, each with the transformers table of the model classes it loads."""
NUMBERS = (bool, int, float)


def auto_classes(model: nn.Module) -> list[str]:
    """The transformers Auto classes whose table lists ``model``'s class (``AutoModelForCausalLM``...);
    ``AutoModel`` when none does."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    found = []
    for auto, table in AUTO_MAPPINGS:
        names = getattr(modeling_auto, table, {})
        if any(name == value or (isinstance(value, tuple | list) and name in value) for value in names.values()):
            found.append(auto)
    return found or ["AutoModel"]


def dense_twin(model: nn.Module) -> nn.Module:
    """The dense architecture of ``model`` (its class on its config, which is still the dense
    one when the config cannot state the pruned widths), on the meta device: no memory."""
    with torch.device("meta"):
        return type(model)(model.config)


def record(model: nn.Module) -> dict[str, Any] | None:
    """``{"shapes": {parameter: shape}, "attributes": {module: {name: value}}}``: what differs from
    the dense architecture; None when a buffer differs too (the module does not rebuild buffers)."""
    dense = dense_twin(model)
    dense_parameters = dict(dense.named_parameters(remove_duplicate=False))
    shapes = {name: list(parameter.shape) for name, parameter in model.named_parameters(remove_duplicate=False)
              if name in dense_parameters and parameter.shape != dense_parameters[name].shape}
    dense_buffers = dict(dense.named_buffers())
    if any(name in dense_buffers and buffer.shape != dense_buffers[name].shape
           for name, buffer in model.named_buffers()):
        return None
    dense_modules = dict(dense.named_modules())
    attributes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        twin = dense_modules.get(name)
        if twin is None:
            return None
        changed = {key: value for key, value in vars(module).items()
                   if not key.startswith("_") and key != "training" and type(value) in NUMBERS and key in vars(twin)
                   and type(vars(twin)[key]) in NUMBERS and vars(twin)[key] != value}
        if changed:
            attributes[name] = changed
    return {"shapes": shapes, "attributes": attributes}


def module_text(model: nn.Module, model_type: str) -> str:
    """The source of :data:`MODULE_FILE` for ``model`` (a family's stock class and its config class)."""
    return TEMPLATE.format(config_class=type(model.config).__name__, model_class=type(model).__name__,
                           model_type=model_type)


def auto_map(model: nn.Module) -> dict[str, str]:
    """The ``auto_map`` of ``config.json``: AutoConfig and the model's Auto class to the module's classes."""
    model_class = f"{MODULE_NAME}.OsscarPrunedModel"
    return {"AutoConfig": f"{MODULE_NAME}.OsscarPrunedConfig", **{auto: model_class for auto in auto_classes(model)}}


TEMPLATE = '''"""This folder's pruned model for stock transformers: from_pretrained(folder, trust_remote_code=True).

Written by osscar_opt (which this module does not need). config.json is the dense model's config
plus "osscar_pruned": the shape of every parameter pruning changed and the numeric attributes of
every module that changed with them. OsscarPrunedModel builds the dense {model_class}, gives those
parameters their pruned shapes and sets those attributes; from_pretrained then loads the weights.
"""

import torch
from torch import nn
from transformers import {config_class}, {model_class}

RECORD = "osscar_pruned"


class OsscarPrunedConfig({config_class}):
    model_type = {model_type!r}


def shrink(model, record):
    """Give the recorded parameters their pruned shapes and set the recorded module attributes."""
    for name, shape in record["shapes"].items():
        owner, _, attribute = name.rpartition(".")
        module = model.get_submodule(owner)
        old = module._parameters[attribute]
        module._parameters[attribute] = nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                                     requires_grad=old.requires_grad)
    for owner, values in record["attributes"].items():
        module = model.get_submodule(owner)
        for key, value in values.items():
            setattr(module, key, value)


class OsscarPrunedModel({model_class}):
    config_class = OsscarPrunedConfig

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        shrink(self, getattr(config, RECORD))
'''
