"""Argument helpers shared by the transformer commands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
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


def positive_int(value: Any, name: str) -> int:
    """An integer >= 1, else ValueError naming ``name``."""
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}") from exc
    if number < 1 or isinstance(value, bool):
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return number
