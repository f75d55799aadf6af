"""The README's plug-in example, registration by call and by entry point, and the registry errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import osscar_opt.backends as registry
from osscar_opt import solve
from tests.helpers import random_problem

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_plugin_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md must contain the plug-in example block"
    return match.group(1)


def test_readme_plugin_example_runs_and_registers():
    namespace: dict = {}
    exec(compile(readme_plugin_example(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert "random-restart" in registry.available()
    problem = random_problem([1] * 16, outputs=4, seed=1)
    solution = solve(problem, 5, backend="random-restart", tries=30, seed=0)
    assert len(solution.support) == 5
    assert solution.loss == pytest.approx(problem.loss(solution.support))
    assert solution.backend == "random-restart" and solution.status == "heuristic"
    assert solve(problem, 5, backend="local-search").loss <= solution.loss + 1e-9


def test_entry_point_backend_is_discovered(tmp_path, monkeypatch):
    package = tmp_path / "third_party_heuristic.py"
    package.write_text(
        "from osscar_opt.backends import Backend\n"
        "class FirstGroups(Backend):\n"
        "    name = 'first-groups'\n"
        "    def solve(self, problem, keep, **options):\n"
        "        return list(range(keep))\n"
    )
    dist = tmp_path / "third_party_heuristic-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-heuristic\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[osscar_opt.backends]\nfirst-groups = third_party_heuristic:FirstGroups\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert "first-groups" in registry.available()
        solution = solve(random_problem([2] * 6, seed=2), 2, backend="first-groups")
        assert solution.support == (0, 1)
    finally:
        registry._REGISTERED.pop("first-groups", None)
        sys.modules.pop("third_party_heuristic", None)


def test_register_rejects_non_backends():
    with pytest.raises(ValueError, match="name"):
        registry.register("", object)
    with pytest.raises(ValueError, match="cls"):
        registry.register("broken", 42)


def test_backend_returning_an_invalid_support_is_reported():
    class TooMany(registry.Backend):
        def solve(self, problem, keep, **options):
            return list(range(keep + 1))

    registry.register("too-many", TooMany)
    try:
        with pytest.raises(ValueError, match="returned 3 groups for keep=2"):
            solve(random_problem([1] * 6, seed=3), 2, backend="too-many")
    finally:
        registry._REGISTERED.pop("too-many", None)


def test_import_is_lazy_about_solvers():
    import subprocess

    code = (
        "import sys, osscar_opt, osscar_opt.backends\n"
        "heavy = ('gurobipy', 'cvxpy', 'pyscipopt', 'transformers')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
