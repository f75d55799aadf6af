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


def test_exports_are_functions_when_the_submodule_is_imported_first():
    code = (
        "import types\n"
        "import osscar_opt.oneshot, osscar_opt.certify\n"
        "from osscar_opt.oneshot import oneshot\n"
        "import osscar_opt\n"
        "assert osscar_opt.oneshot is oneshot, osscar_opt.oneshot\n"
        "assert not isinstance(osscar_opt.certify, types.ModuleType), osscar_opt.certify\n"
        "import sys; assert isinstance(sys.modules['osscar_opt.oneshot'], types.ModuleType)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_export_resolves_and_prune_is_the_pipeline():
    code = (
        "import osscar_opt, osscar_opt.pipeline, osscar_opt.accumulator, osscar_opt.budget\n"
        "from osscar_opt import *\n"
        "missing = [name for name in osscar_opt.__all__ if name not in globals()]\n"
        "assert not missing, missing\n"
        "assert osscar_opt.prune is osscar_opt.pipeline.prune\n"
        "assert osscar_opt.prune_vision is osscar_opt.pipeline.prune_vision\n"
        "assert osscar_opt.LayerRecord is osscar_opt.pipeline.LayerRecord\n"
        "assert osscar_opt.StatsAccumulator is osscar_opt.accumulator.StatsAccumulator\n"
        "assert osscar_opt.keep_count is osscar_opt.budget.keep_count\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
