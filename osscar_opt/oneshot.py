"""``oneshot``: one call from a model and calibration data to a pruned (and optionally saved) model.

In the style of llm-compressor's ``oneshot``: the model may be an object or a local folder / name,
calibration may be token ids, a tokenizer's ``BatchEncoding``, a list of strings or a text file,
and the result is the pruned model and the :class:`~osscar_opt.pipeline.PruneReport`. The lower
level (:func:`osscar_opt.pipeline.prune`, :func:`osscar_opt.save_pruned`) stays public; this module
only resolves the inputs, checks them before any forward pass, and calls it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osscar_opt.budget import DEFAULT_KINDS, Budget, check_sparsity

DEFAULT_SPARSITY = 0.25
"""Fraction of every structure kind removed when no budget is given (the CLI's default)."""
DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 128


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _resolve_model(model: Any, tokenizer: Any, device: str | None, dtype: str | None,
                   offload: bool = False) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``; a folder, ``.gguf`` file or known name is loaded offline (on the
    CPU under ``offload``; a model object is then left where it is, only its dtype changes)."""
    if isinstance(model, str | os.PathLike):
        from osscar_opt.models import load_model

        loaded = load_model(str(model), device="cpu" if offload else device, dtype=dtype)
        return loaded.model, tokenizer if tokenizer is not None else loaded.tokenizer
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch module, a local model folder or a model name, got "
                         f"{type(model).__name__}")
    if offload:
        device = None
    if device is not None or dtype is not None:
        from osscar_opt.models import parse_device, parse_dtype

        model = model.to(device=parse_device(device), dtype=parse_dtype(dtype))
    if tokenizer is None:
        tokenizer = _tokenizer_beside(model)
    return model, tokenizer


def _tokenizer_beside(model: nn.Module) -> Any:
    """The tokenizer saved in the local folder the model was loaded from, or None."""
    source = getattr(model, "name_or_path", None)
    if not source or not Path(str(source)).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError):
        return None


def _budget(budgets: Any, kinds: set[str]) -> Budget | Mapping[str, float]:
    """A float is the sparsity of every kind the model has; mappings and budgets pass through."""
    if budgets is None:
        budgets = DEFAULT_SPARSITY
    if isinstance(budgets, int | float):  # bool too: check_sparsity refuses it
        value = check_sparsity(budgets, "budgets")
        if value == 0.0:
            raise ValueError("budgets: 0 prunes nothing; expected a sparsity in (0, 1), a mapping such as "
                             "{'heads': 0.25, 'neurons': 0.5} or a CostTarget")
        return {kind: value for kind in DEFAULT_KINDS if kind in kinds}
    return budgets


def _texts(calibration: Any) -> list[str] | None:
    """The calibration as a list of strings, or None when it is not text."""
    if isinstance(calibration, str | os.PathLike):
        from osscar_opt.data.text import read_text_file

        if not Path(calibration).is_file():
            raise ValueError(f"calibration: {str(calibration)!r} is not a file (expected a text file, a list of "
                             "strings, token ids or a tokenizer's BatchEncoding)")
        return [read_text_file(calibration, "calibration")]
    if isinstance(calibration, Sequence) and not isinstance(calibration, torch.Tensor) and calibration \
            and all(isinstance(item, str) for item in calibration):
        if not any(item.strip() for item in calibration):
            raise ValueError("calibration: every string is empty")
        return list(calibration)
    if isinstance(calibration, Sequence) and not isinstance(calibration, torch.Tensor) and not calibration:
        raise ValueError("calibration: the list is empty")
    return None


def oneshot(
    model: nn.Module | str | os.PathLike,
    calibration: Any = None,
    *,
    budgets: float | Mapping[str, float] | Budget | None = None,
    tokenizer: Any = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    backend: str = "local-search",
    output_dir: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    offload: bool = False,
    **options: Any,
):
    """Prune ``model`` in one call; returns ``(pruned model, report)``.

    Args:
        model: a supported model object (pruned in place), a local Hugging Face folder, a ``.gguf``
            file, ``"all-minilm-l6-v2"`` or ``"smollm2"`` (loaded offline).
        calibration: a list of strings or a text file (``samples`` windows of ``seq_len`` tokens
            are cut from it with the tokenizer); ``(samples, seq_len)`` token ids or a tokenizer's
            ``BatchEncoding`` without padding; ``(N, C, H, W)`` images for vision models. None:
            the built-in text (Python's docstrings for encoders, Shakespeare for causal LMs).
        budgets: a float (that sparsity for every structure kind the model has; default 0.25), a
            mapping ``{"heads": 0.25, "neurons": 0.5}``, or a budget object such as
            ``CostTarget("macs", 0.6)``.
        tokenizer: needed for text calibration when the model object was not loaded from a local
            folder that holds one; saved with the model.
        samples, seq_len: calibration windows cut from text.
        backend: the solver backend (:func:`osscar_opt.backends.names`).
        output_dir: save the pruned model (and tokenizer, kept ids) here; checked before pruning.
        device, dtype: where and in which dtype to run (``"cpu"``, ``"cuda:0"``; ``"float32"``...).
        offload: keep the model on the CPU (a model object: where it is) and move one stage at a
            time to ``device`` (a model loaded here: default cuda if available; a model object:
            default its own device) for calibration and solving (:func:`osscar_opt.pipeline.prune`).
        **options: passed to :func:`osscar_opt.pipeline.prune` (``damp``, ``target``, ``objective``,
            ``batch_size``, ``backend_options``, ``refit_bias``, ``save_problems``, ``progress``).
    """
    from osscar_opt import backends
    from osscar_opt.adapters.registry import adapter_for
    from osscar_opt.pipeline import prune

    samples, seq_len = _positive(samples, "samples"), _positive(seq_len, "seq_len")
    if not isinstance(offload, bool):
        raise ValueError(f"offload: expected True or False, got {offload!r}")
    compute = None
    if offload and (device is not None or isinstance(model, str | os.PathLike)):
        from osscar_opt.models import parse_device
        from osscar_opt.pipeline.placement import resolve_device

        compute = resolve_device(parse_device(device))
    backends.get(backend)
    if output_dir is not None:
        from osscar_opt.io.folder import check_destination

        check_destination(Path(output_dir))
    model, tokenizer = _resolve_model(model, tokenizer, device, dtype, offload)
    adapter = adapter_for(model)
    budget = _budget(budgets, {structure.kind for structure in adapter.structures()})
    texts = _texts(calibration)
    if calibration is None and hasattr(adapter, "causal_lm"):
        from osscar_opt.data.text import load_texts

        texts = load_texts(None, "calib", adapter.causal_lm)
    if texts is not None:
        if tokenizer is None:
            raise ValueError("tokenizer: text calibration needs a tokenizer (pass tokenizer=, or load the model "
                             "from a folder that holds one)")
        from osscar_opt.data.text import calibration_ids
        from osscar_opt.models import check_seq_len

        check_seq_len(model, seq_len)
        calibration = calibration_ids(tokenizer, texts, samples, seq_len, name="calibration")
    elif calibration is None:
        raise ValueError("calibration: required for this model (e.g. (N, C, H, W) images for a vision model)")
    if offload:
        options.update(offload=True, device=compute)
    report = prune(model, calibration, budget, backend=backend, **options)
    if output_dir is not None:
        from osscar_opt.io import save_pruned

        save_pruned(model, output_dir, tokenizer=tokenizer, report=report)
        report.settings["output_dir"] = str(output_dir)
    return model, report


__all__ = ["DEFAULT_SAMPLES", "DEFAULT_SEQ_LEN", "DEFAULT_SPARSITY", "oneshot"]
