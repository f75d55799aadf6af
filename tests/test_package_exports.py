"""The package's lazy exports resolve to the functions, not to same-named modules."""

from __future__ import annotations

import subprocess
import sys


def test_exports_are_functions_even_after_submodule_import():
    code = (
        "import types\n"
        "from osscar_opt import certify, solve, prune, save_pruned, load_pruned, LayerProblem\n"
        "import osscar_opt.certify\n"
        "from osscar_opt import certify as again\n"
        "assert callable(certify) and not isinstance(again, types.ModuleType), again\n"
        "assert all(callable(f) for f in (solve, prune, save_pruned, load_pruned, LayerProblem))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
