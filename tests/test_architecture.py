"""The package's import graph: no cycle, backends independent of each other and of ``solving``.

Every ``import`` / ``from ... import`` statement is read with ``ast`` (including those inside
functions, which hide cycles from the interpreter but not from a reader), resolved to the
``osscar_opt`` module it loads.
"""

from __future__ import annotations

import ast
from pathlib import Path

import osscar_opt

PACKAGE_ROOT = Path(osscar_opt.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The longest ``osscar_opt`` module that ``name`` names (a module, or a name inside one)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> list[tuple[str, list[str]]]:
    """``(imported module, names taken from it)`` for every import statement of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, []) if submodule in MODULES else (base, [alias.name]))
    return [(target, names) for name, names in found if (target := resolve(name)) is not None]


def graph() -> dict[str, set[str]]:
    return {module: {target for target, _ in imports_of(module) if target != module} for module in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


BACKENDS = "osscar_opt.backends"


def backend_modules() -> list[str]:
    """The backend implementations (not the registry, the interface or the shared ``_*`` modules)."""
    return [
        name for name in MODULES
        if name.startswith(BACKENDS + ".")
        and not name.rpartition(".")[2].startswith("_")
        and name != f"{BACKENDS}.base"
    ]


def test_no_backend_imports_another_backend():
    backends = set(backend_modules())
    assert {"osscar_opt.backends.local_search", "osscar_opt.backends.gurobi"} <= backends
    for module in backends:
        others = {target for target, _ in imports_of(module)} & (backends - {module})
        assert not others, f"{module} imports {sorted(others)}"


def test_no_module_imports_private_names_of_a_backend():
    for module in MODULES:
        for target, names in imports_of(module):
            if target in backend_modules() and target != module:
                private = [name for name in names if name.startswith("_")]
                assert not private, f"{module} imports private {private} from {target}"


def test_no_backend_calls_solve():
    for module in MODULES:
        if module.startswith(BACKENDS + "."):
            targets = {target for target, _ in imports_of(module)}
            assert "osscar_opt.solving" not in targets, f"{module} imports osscar_opt.solving"


def test_only_the_registry_imports_the_concrete_adapters():
    families = {f"osscar_opt.adapters.{name}" for name in ("bert", "opt", "gpt2", "llama", "resnet", "mobilenet",
                                                             "phi3", "gpt_neox", "distilbert", "mpnet",
                                                             "modernbert", "vit", "convnext", "torchvision_vit")}
    for module in MODULES:
        if module.startswith("osscar_opt.adapters.") and module != "osscar_opt.adapters.registry":
            imported = {target for target, _ in imports_of(module)} & families
            assert not imported, f"{module} imports {sorted(imported)}"


def test_the_problem_and_backends_know_no_model_code():
    lower_layers = ["osscar_opt.problem", "osscar_opt.accumulator", "osscar_opt.solving", "osscar_opt.relaxation"]
    lower_layers += [name for name in MODULES if name.startswith(BACKENDS)]
    upper = ("osscar_opt.adapters", "osscar_opt.formulations", "osscar_opt.pipeline", "osscar_opt.io")
    for module in lower_layers:
        for target, _ in imports_of(module):
            assert not target.startswith(upper), f"{module} imports {target}"


def test_no_module_cites_a_design_file_outside_the_repository():
    for module, path in MODULES.items():
        assert "DESIGN.md" not in path.read_text(), f"{module} cites DESIGN.md; cite docs/architecture.md"


MAX_MODULE_LINES = 600
LONG_MODULE_REASON = "Why one module of over 600 lines:"


def test_no_module_is_over_600_lines_unless_its_docstring_says_why():
    for module, path in MODULES.items():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            assert LONG_MODULE_REASON in docstring, (
                f"{module} has {lines} lines (limit {MAX_MODULE_LINES}); split it into one job per module, or say "
                f"in its docstring, after '{LONG_MODULE_REASON}', why it is one job"
            )


def test_the_pipeline_package_has_one_job_per_module():
    pipeline = {name for name in MODULES if name.startswith("osscar_opt.pipeline.")}
    assert pipeline >= {f"osscar_opt.pipeline.{job}" for job in
                        ("placement", "settings", "stage", "allocation", "plan", "report")}
    prune = next(node for node in ast.parse(MODULES["osscar_opt.pipeline"].read_text()).body
                 if isinstance(node, ast.FunctionDef) and node.name == "prune")
    assert prune.end_lineno - prune.lineno + 1 < 80, "prune() should read as the pipeline, in under 80 lines"


def test_only_the_allocation_module_of_the_pipeline_imports_the_allocation_code():
    allocation_code = {"osscar_opt.curves", "osscar_opt.costs", "osscar_opt.allocate", "osscar_opt.batch"}
    for module in MODULES:
        if module == "osscar_opt.pipeline" or module.startswith("osscar_opt.pipeline."):
            imported = {target for target, _ in imports_of(module)} & allocation_code
            if module != "osscar_opt.pipeline.allocation":
                assert not imported, f"{module} imports {sorted(imported)}: a cost target's tables and curves " \
                                     "belong to osscar_opt.pipeline.allocation"
