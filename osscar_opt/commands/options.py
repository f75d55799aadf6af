"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
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


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--ray``, ``--executor``, ``--results``, ``--retries``: where a batch runs."""
    group = parser.add_argument_group("workers (osscar_opt.batch)")
    group.add_argument("--workers", type=int, default=None,
                       help="tasks at once: local worker processes, or the CPUs of a local Ray cluster")
    group.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                       help="run the tasks on Ray: 'auto' (default: the cluster RAY_ADDRESS names, else a new local "
                       "one), host:port or ray://host:port (needs pip install 'osscar-opt[ray]')")
    group.add_argument("--executor", default=None,
                       help="serial, processes or ray (default: ray with --ray, processes with --workers, else "
                       "serial)")
    group.add_argument("--results", default=None, metavar="JSONL",
                       help="append each finished task to this JSON-lines file; a rerun with it skips what is done")
    group.add_argument("--retries", type=int, default=2,
                       help="re-runs of a task whose worker process died (default 2)")
    group.add_argument("--threads", type=int, default=None,
                       help="torch threads per task (default: all for serial, cores / workers for processes, 1 on "
                       "Ray); the same count gives the same rows bit for bit on every executor")


def executor_from(args: argparse.Namespace):
    """The executor the arguments of :func:`add_executor_arguments` name, checked and connected
    (an unreachable --ray address fails here, before any problem is read)."""
    from osscar_opt.executors import EXECUTORS, make_executor

    name = args.executor
    if name is not None and name not in EXECUTORS:
        raise ValueError(f"--executor: expected one of {list(EXECUTORS)}, got {name!r}")
    if args.ray is not None and name not in (None, "ray"):
        raise ValueError(f"--executor: --ray runs the tasks on Ray, not with executor {name!r}")
    if args.workers is not None and (isinstance(args.workers, bool) or args.workers < 1):
        raise ValueError(f"--workers: expected a positive number of workers, got {args.workers}")
    if args.retries < 0:
        raise ValueError(f"--retries: expected an integer >= 0, got {args.retries}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: expected a positive number of threads, got {args.threads}")
    check_output_path(args.results, "--results")
    if name is None:
        name = "ray" if args.ray is not None else "processes" if args.workers is not None else "serial"
    address = args.ray if name == "ray" and args.ray != "auto" else None
    try:
        return make_executor(name, args.workers, args.retries, address)
    except ValueError as exc:
        text = str(exc)
        for argument, flag in (("workers:", "--workers:"), ("address:", "--ray:"), ("executor:", "--executor:")):
            if text.startswith(argument):
                raise ValueError(flag + text[len(argument):]) from None
        raise


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` for the forward passes."""
    parser.add_argument("--device", type=device_value, default=None,
                        help="torch device (default: cuda if available, else cpu)")
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
    from osscar_opt.pipeline.settings import DEFAULT_DAMP, DEFAULT_OBJECTIVE, OBJECTIVES, TARGETS

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
            from osscar_opt.pipeline.stage import INCOMPLETE_MARKER

            if (path / INCOMPLETE_MARKER).is_file():
                print(f"note: {item} is marked INCOMPLETE: the prune that wrote it was interrupted, so it holds the "
                      f"problems of its first stages only ({len(found)} files)", file=sys.stderr)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"files: no such file or folder: {item}")
    return files


# --- checks made before any work (model loading, solving) -------------------------------------------------------


class PartialFailure(Exception):
    """A batch command (``solve``, ``certify``) finished, but some of its items failed.

    Every row was printed (the failed ones with ``status: "error"``); the message counts the
    failures. ``osscar`` exits with code 5 on it.
    """


def error_text(exc: BaseException) -> str:
    """One line for ``exc``: its message (whitespace collapsed), with the class name unless it is a
    ValueError, OSError or ImportError (whose messages say what they are)."""
    message = " ".join(str(exc).split())
    if isinstance(exc, ValueError | OSError | ImportError) and message:
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def error_row(path: Path, name: str, keep: int | None, exc: BaseException, **fields: Any) -> dict[str, Any]:
    """The row of a batch item that failed: file, name, keep, ``status: "error"`` and the message."""
    return {"file": path.name, "name": name, **fields, "keep": keep, "status": "error", "error": error_text(exc)}


def is_error_row(row: dict[str, Any]) -> bool:
    """Whether a batch row (``solve``, ``certify``) is the row of an item that failed."""
    return row.get("status") == "error"


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_path(value: str | Path | None, flag: str, kind: str = "file", replace: bool = False) -> None:
    """Refuse an output path that cannot be written, before any work, with a ValueError naming ``flag``.

    ``kind`` is "file" (the path must not be a folder) or "folder" (it must not be a file). A path
    that does not exist yet needs its nearest existing parent to be a writable folder (missing
    folders are created when the output is written); an existing one must be writable itself.
    ``replace``: the output is written beside the path and moved over it (``prune --output``), so
    its parent must be writable too.
    """
    if value is None:
        return
    path = Path(value)
    if not str(value).strip():
        raise ValueError(f"{flag}: expected a path, got an empty string")
    if path.exists():
        if kind == "file" and path.is_dir():
            raise ValueError(f"{flag}: {path} is a folder; expected a file path")
        if kind == "folder" and not path.is_dir():
            raise ValueError(f"{flag}: {path} exists and is not a folder")
        mode = os.W_OK | os.X_OK if kind == "folder" else os.W_OK
        if not os.access(path, mode):
            raise ValueError(f"{flag}: {path} is not writable")
        if not replace:
            return
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise ValueError(f"{flag}: cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot write {path}: folder {parent} is not writable")


def device_value(text: str) -> str:
    """``--device``: a torch device this machine has (argparse type; a missing GPU fails before any work)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use --device cpu")
    return text


INTEGER_OPTIONS = ("stages", "max_swaps", "swap_size", "swap_candidates", "refresh_every", "restarts",
                   "restart_patience", "threads", "relaxation_iterations", "max_iterations", "max_subsets",
                   "max_variables")


def accepted_options(cls: type) -> tuple[str, ...] | None:
    """The option names backend ``cls`` accepts, or None when it does not say (its solve checks them)."""
    from osscar_opt.backends.base import declared_options

    return declared_options(cls)


def _check_option_values(options: dict[str, Any]) -> None:
    """Types of the options the built-in backends share (their ranges are checked by the backends)."""
    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    for key, value in options.items():
        where = f"--backend-option {key}"
        if key == "time_limit" and value is not None and not (number(value) and value > 0):
            raise ValueError(f"{where}: expected a positive number of seconds, got {value!r}")
        if key in ("rel_gap", "mip_gap") and not (number(value) and 0 <= value < 1):
            raise ValueError(f"{where}: expected a number in [0, 1), got {value!r}")
        if key == "seed" and not (isinstance(value, int) and not isinstance(value, bool)
                                  and -(2 ** 63) <= value < 2 ** 64):
            raise ValueError(f"{where}: expected an integer in [-2**63, 2**64), got {value!r}")
        if key in INTEGER_OPTIONS and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if key == "formulation":
            from osscar_opt.backends._exact import check_formulation

            check_formulation(value)


def check_backend(name: str, options: dict[str, Any] | None = None, flag: str = "--backend",
                  installed: bool = True, formulation: str | None = None) -> type:
    """The backend class registered as ``name``, with ``options`` checked against the names it accepts
    and the shared option types, all before any work; ``installed``: its packages must be there."""
    from osscar_opt import backends
    from osscar_opt.backends.base import check_options

    try:
        cls = backends.get(name)
    except ValueError as exc:
        raise ValueError(f"{flag}: {str(exc).removeprefix('backend: ')}") from None
    options = options or {}
    allowed = accepted_options(cls)
    if allowed is not None:  # a plugin that does not declare its options checks them when it solves
        check_options(name, options, allowed)
        _check_option_values(options)
    own = getattr(cls, "formulations", None)  # a backend with formulations of its own names them
    if formulation is not None and own is not None and formulation not in own:
        raise ValueError(f"{flag} {name}:{formulation}: formulation: expected one of {tuple(own)}, got {formulation!r}")
    if formulation is not None and own is None and (allowed is None or "formulation" in allowed):
        from osscar_opt.backends._exact import check_formulation

        try:
            check_formulation(formulation)
        except ValueError as exc:
            raise ValueError(f"{flag} {name}:{formulation}: {exc}") from None
    if installed and not cls.is_installed():
        raise ValueError(f"{flag}: {cls.missing_message()}")
    return cls
