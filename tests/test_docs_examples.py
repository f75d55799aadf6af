"""The README's and the manual's Python examples run, so an example that no longer works fails CI.

Each page's ```python blocks run in order as one script (a later block may use what an earlier one
made), in a fresh interpreter, in an empty working folder, offline. A page whose examples load a
real model says so with ``<!-- examples: slow -->`` and runs in the slow set. A block right after
``<!-- not run: <reason> -->`` is skipped (none is, today). The README's relative links must name
files that exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- not run:[^>]*-->\s*)?```python\n(.*?)```", re.S)
SLOW_MARK = "<!-- examples: slow -->"


def examples(page: Path) -> list[str]:
    """The page's Python blocks that run, in order."""
    return [code for skipped, code in BLOCK.findall(page.read_text()) if not skipped]


def page_params():
    params = []
    for page in PAGES:
        if not examples(page):
            continue
        marks = [pytest.mark.slow] if SLOW_MARK in page.read_text() else []
        params.append(pytest.param(page, id=str(page.relative_to(REPO)), marks=marks))
    return params


def test_the_readme_and_the_guides_have_examples():
    assert examples(REPO / "README.md"), "the README shows each of the three uses in Python"
    with_examples = {page.name for page in PAGES if examples(page)}
    assert {"transformers.md", "targets.md", "certification.md", "batches.md", "backends.md"} <= with_examples


def test_the_block_finder_skips_blocks_marked_not_run(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nrun = 1\n```\n<!-- not run: needs a GPU -->\n```python\nskipped = 1\n```\n")
    assert examples(page) == ["run = 1\n"]


@pytest.mark.parametrize("page", page_params())
def test_the_examples_of_a_page_run(page, tmp_path):
    script = tmp_path / "examples.py"
    script.write_text("\n\n".join(examples(page)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OSSCAR_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, f"{page.name}: its examples failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"


def test_the_readme_links_name_files_that_exist():
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [target for target in targets if "://" not in target]
    assert local, "the README links into the manual"
    missing = [target for target in local if not (REPO / target).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
