"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parse_backend_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are parsed as JSON when they can be (numbers, booleans)."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"backend_option: expected key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options[key.strip().replace("-", "_")] = value
    return options


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backend NAME`` and repeated ``--backend-option key=value``."""
    parser.add_argument("--backend", default="local-search", help="backend name (default: local-search)")
    parser.add_argument(
        "--backend-option", action="append", default=[], metavar="KEY=VALUE",
        help="backend option, repeatable (values parsed as JSON when possible)",
    )


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` for the forward passes."""
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="forward dtype: float32, bfloat16, float16, float64")


def damp_value(text: str) -> float | str:
    """``--damp``: ``auto`` or a positive number (argparse type; bad values name the flag)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}")
    return value


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """``--target``, ``--damp`` and ``--refit-bias``: how each pruned layer is fit."""
    from osscar_opt.pipeline import DEFAULT_DAMP, DEFAULT_OBJECTIVE, OBJECTIVES, TARGETS

    parser.add_argument(
        "--target", choices=TARGETS, default=None,
        help="what each pruned layer is fit to: the dense weights on the pruned model's input (pruned-input) "
        "or the dense model's layer output (dense-output); default pruned-input for transformers, "
        "dense-output for torchvision networks",
    )
    parser.add_argument(
        "--damp", type=damp_value, default=DEFAULT_DAMP,
        help="ridge weight relative to mean diag(X^T X), or 'auto' (chosen per layer on held-out calibration "
        f"samples, every 4th sample held out); default {DEFAULT_DAMP}",
    )
    parser.add_argument(
        "--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
        help="energy: squared error summed over tokens; token: each token's error divided by its dense output's "
        f"energy (every token counts the same); default {DEFAULT_OBJECTIVE}",
    )
    parser.add_argument("--refit-bias", action="store_true", help="re-fit the bias of layers that have one")


def positive_int(value: Any, name: str) -> int:
    """An integer >= 1, else ValueError naming ``name``."""
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}") from exc
    if number < 1 or isinstance(value, bool):
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return number


def saved_budgets(problem: Any, keeps: Sequence[int] | None, sparsity: float | None) -> list[int]:
    """Budgets to solve a saved problem at: ``--keep`` values, ``--sparsity`` (by the pipeline's
    rule, :func:`osscar_opt.budget.keep_count`), or the budget saved with the problem."""
    from osscar_opt.budget import keep_count

    if keeps:
        return list(keeps)
    if sparsity is not None:
        return [keep_count(problem.num_groups, sparsity)]
    if problem.keep is None:
        raise ValueError(
            f"keep: problem {problem.meta.get('name', '?')} has no saved budget; pass --keep or --sparsity"
        )
    return [problem.keep]


def problem_files(items: Sequence[str]) -> list[Path]:
    """Problem files named by ``items``: files, or folders whose ``*.safetensors`` files are taken (sorted)."""
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("*.safetensors"))
            if not found:
                raise ValueError(f"files: folder {item} holds no *.safetensors problem files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"files: no such file or folder: {item}")
    return files
