"""Save/reload family "transformers": stock transformers classes with per-block dimensions.

``export`` records the model class (``transformers.<ClassName>``), the adapter family and the
kept attention groups / MLP neurons of every block. ``write_files`` writes ``config.json``:

* when the family's config can express the pruned widths (the same in every block; LLaMA /
  Qwen2 / Mistral have ``head_dim`` and ``num_key_value_heads`` fields, BERT / OPT / GPT-2 only
  the MLP width), the config *of the pruned model*, which stock ``from_pretrained`` loads;
* otherwise the dense config with ``model_type`` replaced by :data:`NOT_STOCK_TYPE`, an
  ``osscar_pruned`` entry holding the real ``model_type``, the per-block widths and what
  :mod:`osscar_opt.io.remote_code` needs, and an ``auto_map`` naming the small module it writes
  beside the config: stock ``from_pretrained(folder, trust_remote_code=True)`` (and
  ``SentenceTransformer(folder, trust_remote_code=True)``) rebuild the pruned widths; without
  ``trust_remote_code`` transformers refuses and says to pass it. Where the remote code cannot
  rebuild the model (removed sublayers, Phi-3's fused projections) there is no ``auto_map`` and
  the ``model_type`` (:data:`LOAD_PRUNED_TYPE`) says to load the folder with
  :func:`osscar_opt.load_pruned`.

A sentence-transformers folder the model came from (``modules.json`` beside its config) keeps its
module files (pooling, normalization). ``rebuild`` instantiates the class from the config, shrinks
every block to the saved dimensions and loads the weights strictly.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osscar_opt.adapters.registry import adapter_for
from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.io import remote_code
from osscar_opt.io.folder import read_json


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


NOT_STOCK_TYPE = ("{model_type}-pruned (per-layer widths: load it with from_pretrained(folder, trust_remote_code=True) "
                  "or osscar_opt.load_pruned)")
"""``model_type`` written into ``config.json`` when stock classes cannot rebuild the pruned widths."""
LOAD_PRUNED_TYPE = "{model_type}-pruned (per-layer widths or removed sublayers: load it with osscar_opt.load_pruned)"
"""``model_type`` written where the remote-code module cannot rebuild the model either."""
CONFIG_RECORD = "osscar_pruned"
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def stock_loadable(model: nn.Module) -> bool:
    """True when the config this module writes reloads ``model`` with stock ``from_pretrained``."""
    return adapter_for(model).stock_config_fields() is not None


def _config_document(model: nn.Module, directory: Path) -> dict[str, Any]:
    """The ``config.json`` document for ``model`` (see the module docstring)."""
    adapter = adapter_for(model)
    config = copy.deepcopy(model.config)
    for stale in ("quantization_config", "_name_or_path", "auto_map"):
        if hasattr(config, stale):
            delattr(config, stale)  # weights are saved dequantized; the source path is not this folder
    config.architectures = [type(model).__name__]
    fields = adapter.stock_config_fields()
    for name, value in (fields or {}).items():
        setattr(config, name, value)
    config.save_pretrained(str(directory))
    document = json.loads((directory / "config.json").read_text())
    document.pop("quantization_config", None)
    document.pop("auto_map", None)
    if fields is None:
        rebuilt = remote_code.record(model) if adapter.remote_code_rebuilds() else None
        document[CONFIG_RECORD] = {"model_type": document["model_type"], "blocks": adapter.dims(), **(rebuilt or {})}
        template = NOT_STOCK_TYPE if rebuilt is not None else LOAD_PRUNED_TYPE
        document["model_type"] = template.format(model_type=document["model_type"])
        if rebuilt is not None:
            document["auto_map"] = remote_code.auto_map(model)
    return document


def sentence_transformers_source(model: nn.Module) -> Path | None:
    """The local sentence-transformers folder ``model`` was loaded from (``modules.json`` there), or None."""
    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        return None
    folder = Path(str(source))
    return folder if (folder / "modules.json").is_file() else None


def _copy_sentence_transformers_files(source: Path, directory: Path) -> None:
    """Copy the sentence-transformers module description and its non-root modules (pooling...)."""
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)
    for module in json.loads((source / "modules.json").read_text()):
        path = str(module.get("path", ""))
        if path and (source / path).is_dir() and not (directory / path).exists():
            shutil.copytree(source / path, directory / path)


def write_files(model: nn.Module, directory: Path) -> None:
    """Write ``config.json`` (pruned, or marked for ``load_pruned``), the generation config when the
    model generates, and the sentence-transformers files of the folder the model came from."""
    document = _config_document(model, directory)
    (directory / "config.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    if "auto_map" in document:
        (directory / remote_code.MODULE_FILE).write_text(remote_code.module_text(model, document["model_type"]))
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(str(directory))
    source = sentence_transformers_source(model)
    if source is not None:
        _copy_sentence_transformers_files(source, directory)


def read_config(directory: Path):
    """The model's config from ``config.json``: the stock one, or the one marked for ``load_pruned``."""
    import transformers

    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"directory: {directory} has no config.json")
    document = read_json(path)
    if not isinstance(document, dict):
        raise ValueError(f"directory: {path} is not a configuration (a JSON object)")
    record = document.pop(CONFIG_RECORD, None)
    document.pop("auto_map", None)  # the module it names is this folder's, not the loaded model's
    if isinstance(record, dict):
        document["model_type"] = record.get("model_type")
    model_type = document.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"directory: {path} has an unknown model_type {model_type!r}")
    return transformers.CONFIG_MAPPING[model_type].from_dict(document)


def _dtype(meta: dict[str, Any], meta_path: Path) -> torch.dtype:
    dtype = getattr(torch, str(meta.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"directory: {meta_path} names an unknown dtype {meta.get('dtype')!r}")
    return dtype


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Load ``state`` strictly; missing / unexpected keys and shape mismatches (e.g. an alias whose
    source has another shape than the parameter) are ValueErrors naming the files."""
    from osscar_opt.io.folder import META_FILE, WEIGHTS_FILE

    where = f"{directory / WEIGHTS_FILE} (with the aliases of {directory / META_FILE})"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise ValueError(f"directory: weights in {where} do not fit the model: {exc}") from exc
    if missing or unexpected:
        raise ValueError(
            f"directory: weights in {where} do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def rebuild(meta: dict[str, Any], state: dict[str, torch.Tensor], directory: Path) -> nn.Module:
    """The saved model as its original transformers class, in eval mode.

    The saved per-block dimensions are checked against the dense model the config builds before any
    block is resized (:meth:`~osscar_opt.adapters.transformer.TransformerAdapter.restore_dims`)."""
    import transformers

    from osscar_opt.io.folder import META_FILE

    directory = Path(directory)
    meta_path = directory / META_FILE
    cls = getattr(transformers, str(meta.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"directory: {meta_path} names an unknown transformers class {meta.get('class')!r}")
    dtype = _dtype(meta, meta_path)
    if not isinstance(meta.get("blocks"), list):
        raise ValueError(f"directory: {meta_path} has no per-block dimensions ('blocks': a list)")
    config = read_config(directory)
    model = cls(config).to(dtype)
    try:
        adapter_for(model).restore_dims(meta["blocks"])
    except ValueError as exc:
        raise ValueError(f"directory: {meta_path} 'blocks' do not fit the model of {directory / 'config.json'}: "
                         f"{exc}") from exc
    _load_weights(model, state, directory)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
