"""The ``osscar`` command: one sub-command per module in ``osscar_opt.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func=run`` (a function of the parsed arguments returning an exit code).

:func:`main` is the one error boundary: an exception escaping a command becomes one line
``osscar <command>: error: <message>`` on stderr and an exit code by its class (:data:`EXIT_CODES`);
``--debug`` lets it through with its traceback. A command may set ``args.interrupt_note`` to say
what a Ctrl-C leaves on disk (default "nothing was saved").
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path

COMMAND_MODULES = (
    "osscar_opt.commands.prune",
    "osscar_opt.commands.evaluate",
    "osscar_opt.commands.solve",
    "osscar_opt.commands.certify",
    "osscar_opt.commands.export",
)

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_INPUT = 2
EXIT_FILES = 3
EXIT_RUNTIME = 4
EXIT_PARTIAL = 5
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_UNEXPECTED: "unexpected error (a bug: re-run with --debug for the traceback)",
    EXIT_INPUT: "bad input: arguments, option values, paths or file contents (checked before any work where "
    "possible)",
    EXIT_FILES: "file system error (OSError: permission denied, disk full, missing file)",
    EXIT_RUNTIME: "solver or runtime error (RuntimeError such as CUDA out of memory, a solver's own error such "
    "as gurobipy.GurobiError, MemoryError, a missing optional package)",
    EXIT_PARTIAL: "solve / certify finished, but some problems failed (their rows say status error)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}

# Top-level packages whose exceptions are solver errors (exit code 4).
SOLVER_PACKAGES = ("gurobipy", "cvxpy", "pyscipopt", "highspy", "mosek")


def _epilog() -> str:
    lines = ["exit codes:"]
    for code, text in EXIT_CODES.items():
        lines += textwrap.wrap(text, 79, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
    lines.append("--debug (before or after the command) shows an error's traceback instead of one line.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="osscar",
        description="One-shot structured pruning by combinatorial optimization (OSSCAR).",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show its traceback (re-raise it)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # command not built yet in this checkout
            raise
        module.register(subparsers)
    for subparser in subparsers.choices.values():  # `osscar solve DIR --debug` works too
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="on an error, show its traceback (re-raise it)")
    return parser


def exit_code(exc: BaseException) -> int:
    """The exit code of an exception that escaped a command (see :data:`EXIT_CODES`)."""
    from osscar_opt.commands.options import PartialFailure

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, PartialFailure):
        return EXIT_PARTIAL
    if isinstance(exc, ValueError):
        return EXIT_INPUT
    if isinstance(exc, OSError):
        return EXIT_FILES
    solver = any(klass.__module__.split(".")[0] in SOLVER_PACKAGES for klass in type(exc).__mro__)
    if solver or isinstance(exc, RuntimeError | MemoryError | ImportError):
        return EXIT_RUNTIME
    return EXIT_UNEXPECTED


def error_line(command: str, exc: BaseException) -> str:
    """The one line printed for ``exc``: ``osscar <command>: error: <message>``."""
    from osscar_opt.commands.options import PartialFailure, error_text

    code = exit_code(exc)
    text = " ".join(str(exc).split()) if isinstance(exc, PartialFailure) else error_text(exc)
    if code == EXIT_UNEXPECTED:
        text += " (unexpected error; re-run with --debug for the traceback)"
    elif code == EXIT_RUNTIME:
        text += " (--debug shows the traceback)"
    return f"osscar {command}: error: {text}"


@contextlib.contextmanager
def _warning_lines(command: str):
    """osscar_opt's own warnings as one line each, ``osscar <command>: warning: <message>``, on stderr
    (other packages' warnings are shown as Python shows them)."""
    package = Path(__file__).resolve().parent
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and Path(filename).resolve().is_relative_to(package):
            print(f"osscar {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_INPUT
    if args.debug:
        return int(args.func(args) or 0)
    try:
        with _warning_lines(args.command):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        note = getattr(args, "interrupt_note", None) or "nothing was saved"
        print(f"\nosscar {args.command}: interrupted; {note}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the one error boundary: one line, an exit code by class
        print(error_line(args.command, exc), file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
