"""``osscar certify``'s table, notes, JSON and plot; wall-clock time limits and recorded solver
warnings of the exact backends; the prune report's layer plot. Real solvers, no mocks."""

from __future__ import annotations

import importlib.util
import json
import time
import warnings

import pytest

from osscar_opt import solve
from osscar_opt.cli import main
from osscar_opt.commands.certify import certify_rows, format_rows
from osscar_opt.plots import gap_plot, layer_plot
from tests.helpers import random_problem

HAS_GUROBI = importlib.util.find_spec("gurobipy") is not None
HAS_CVXPY = importlib.util.find_spec("cvxpy") is not None and importlib.util.find_spec("pyscipopt") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LONG_NAME = "model.decoder.layers.11.self_attn.out_proj.with.a.very.long.name.that.cannot.fit"


def _backends() -> list[str]:
    names = (["gurobi"] if HAS_GUROBI else []) + (["cvxpy"] if HAS_CVXPY else [])
    return [arg for name in names for arg in ("--backend", name)] or ["--backend", "none"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two small saved problems (one with a long layer name) and a 120-group one."""
    folder = tmp_path_factory.mktemp("problems")
    small = random_problem([2] * 8, outputs=6, seed=31)
    small.meta["name"] = LONG_NAME
    small.save(folder / "a_small.safetensors")
    other = random_problem([1] * 10, outputs=5, seed=32)
    other.meta["name"] = "encoder.layer.0.output.dense"
    other.save(folder / "b_other.safetensors")
    wide = random_problem([1] * 120, outputs=6, seed=33, rows=300)
    wide.meta["name"] = "mlp.down_proj"
    wide_path = folder.parent / "wide.safetensors"
    wide.save(wide_path)
    return {"folder": folder, "small": small, "other": other, "wide": wide_path}


@pytest.fixture(scope="module")
def hard_problem():
    """40 groups at keep 12: neither exact backend closes the gap in seconds."""
    return random_problem([3] * 40, outputs=24, seed=5, rank=12, noise=0.5)


@pytest.mark.parametrize("backend", [
    pytest.param("gurobi", marks=pytest.mark.skipif(not HAS_GUROBI, reason="gurobipy not installed")),
    pytest.param("cvxpy", marks=pytest.mark.skipif(not HAS_CVXPY, reason="cvxpy / SCIP not installed")),
])
def test_exact_backend_keeps_a_small_time_limit_for_the_whole_call_with_a_valid_bound(hard_problem, backend):
    keep, limit = 12, 0.5
    heuristic = solve(hard_problem, keep, "local-search")
    solve(random_problem([1] * 6, seed=1), 2, backend, time_limit=5)  # first-import cost out of the timing
    begin = time.perf_counter()
    solution = solve(hard_problem, keep, backend, time_limit=limit)  # default warm start: a local search
    elapsed = time.perf_counter() - begin
    assert elapsed <= limit + 2.0, f"{backend} took {elapsed:.2f} s with time_limit={limit}"
    assert solution.status == "time_limit"
    assert solution.lower_bound is not None and 0 < solution.lower_bound <= solution.loss
    assert solution.lower_bound <= heuristic.loss * (1 + 1e-9)
    assert solution.gap is not None and solution.gap > 0


@pytest.mark.skipif(not HAS_CVXPY, reason="cvxpy / SCIP not installed")
def test_cvxpy_inaccurate_solution_warning_is_recorded_in_the_status_not_printed():
    problem = random_problem([2] * 12, outputs=8, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a one-node SCIP limit leaves a master unfinished: CVXPY warns "Solution may be inaccurate"
        solution = solve(problem, 4, "cvxpy", solver_options={"scip_params": {"limits/nodes": 1}}, time_limit=30)
    assert not [w for w in caught if "inaccurate" in str(w.message)]
    assert solution.status == "inaccurate"
    assert "inaccurate" in solution.info["solver_warnings"]
    assert solution.lower_bound <= solve(problem, 4, backend="enumerate").loss


def test_certify_table_is_labelled_fits_100_columns_and_reports_the_best_bound_relative_to_c0(saved, tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(["certify", str(saved["folder"]), "--keep", "2", "--iterations", "20", "--time-limit", "20",
                 *_backends(), "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    header = next(line for line in lines if line.startswith("layer"))
    for column in ("groups", "keep", "heur. loss", "bound", "gap %", "status", "method", " s"):
        assert column in header
    assert "c0" in text.split(header)[0]  # the unit is named above the header
    rows = json.loads(out.read_text())
    assert [(row["file"], row["keep"]) for row in rows] == [("a_small.safetensors", 2), ("b_other.safetensors", 2)]
    table = [line.split() for line in lines[lines.index(header) + 2:][:len(rows)]]
    assert LONG_NAME not in text and table[0][0].startswith("...")  # too long: ellipsized from the left
    assert LONG_NAME.endswith(table[0][0][3:]) and len(table[0][0]) >= 20
    assert table[1][0] == "encoder.layer.0.output.dense"
    exact = [arg for arg in _backends() if not arg.startswith("--") and arg != "none"]
    for row, cells in zip(rows, table, strict=True):
        problem = saved["small"] if row["file"] == "a_small.safetensors" else saved["other"]
        optimum = solve(problem, row["keep"], backend="enumerate").loss
        assert row["c0"] == pytest.approx(problem.c0) and row["unit"] == "loss / c0"
        assert row["best_bound"] <= optimum <= row["heuristic_loss"] * (1 + 1e-9)
        bounds = [row["bound"]] + [e["lower_bound"] for e in row["exact"].values() if e.get("lower_bound") is not None]
        assert row["best_bound"] == pytest.approx(min(max(bounds), row["heuristic_loss"]))
        assert row["best_bound_relative"] == pytest.approx(row["best_bound"] / problem.c0)
        assert row["heuristic_loss_relative"] == pytest.approx(row["heuristic_loss"] / problem.c0)
        assert sorted(row["exact"]) == sorted(f"{name}:outer-approximation" for name in exact)
        for entry in row["exact"].values():  # every backend's details, raw and relative
            assert {"loss", "lower_bound", "gap", "status", "seconds", "loss_relative", "info"} <= set(entry)
        # the printed line: groups, keep, relative heuristic loss and bound, gap %, best status and method
        assert cells[-8:-6] == [str(row["groups"]), str(row["keep"])]
        assert float(cells[-6]) == pytest.approx(row["heuristic_loss_relative"], rel=1e-3)
        assert float(cells[-5]) == pytest.approx(row["best_bound_relative"], rel=1e-3)
        assert float(cells[-4]) == pytest.approx(100 * row["heuristic_gap"], abs=0.006)
        assert cells[-3] == row["best_status"] and row["best_status"] == ("optimal" if exact else "bound")
        if exact:  # small problems: an exact backend proves the optimum, and its bound is the best one
            assert cells[-2] == row["best_method"].replace("outer-approximation", "oa")
            assert row["best_method"] in row["exact"]
    assert not (tmp_path / "gap.png").exists()  # no --plot, no picture


def test_certify_skips_keeps_at_or_above_the_groups_and_notes_tiny_keeps_before_solving(saved, tmp_path, capsys):
    out = tmp_path / "rows.json"
    small = saved["folder"] / "a_small.safetensors"
    code = main(["certify", str(small), str(saved["wide"]), "--keep", "2", "8", "9", "--iterations", "10",
                 "--heuristic", "greedy", "--backend", "none", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100  # long lines are wrapped
    assert len([line for line in lines if line.startswith("skip")]) == 1
    assert f"skip {LONG_NAME}: keep 8, 9 >= its 8 groups (nothing to choose)" in " ".join(text.split())
    notes = [line for line in lines if line.startswith("note")]
    assert notes == ["note mlp.down_proj: keep 2 of 120 groups (1.7%): a tiny share of this layer"]
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    assert lines.index(notes[0]) < header  # said before the solves and the table
    rows = json.loads(out.read_text())
    assert [(row["name"], row["keep"]) for row in rows] == [
        (LONG_NAME, 2), ("mlp.down_proj", 2), ("mlp.down_proj", 8), ("mlp.down_proj", 9)]
    assert [row["notes"] for row in rows] == [[], ["keep 2 of 120 groups (1.7%)"], [], []]
    assert all(row["best_status"] == "bound" and row["best_method"] == "relax" for row in rows)


def test_certify_plot_option_writes_a_gap_png(saved, tmp_path, capsys):
    png = tmp_path / "plots" / "gap.png"
    code = main(["certify", str(saved["folder"]), "--keep", "2", "3", "4", "--iterations", "20",
                 "--heuristic", "greedy", "--backend", "none", "--plot", str(png)])
    assert code == 0
    assert f"plot: {png}" in capsys.readouterr().out
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 5000


def test_gap_plot_and_table_from_real_certify_rows_with_an_exact_backend(saved, tmp_path):
    exact = [("gurobi", "outer-approximation")] if HAS_GUROBI else []
    files = sorted(saved["folder"].glob("*.safetensors"))
    rows = certify_rows(files, [2, 4], "greedy", exact, {"time_limit": 10.0}, "scalar", 20)
    assert len(rows) == 4
    assert all(len(line) <= 100 for line in format_rows(rows).splitlines())
    path = gap_plot(rows, tmp_path / "gap.png", title="gaps")
    assert path == tmp_path / "gap.png" and path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="rows"):
        gap_plot([], tmp_path / "empty.png")


def test_layer_plot_draws_a_real_prune_report(tmp_path):
    from osscar_opt.pipeline import prune
    from tests.tiny_transformers import tiny_model, token_ids

    report = prune(tiny_model("llama"), token_ids(), {"heads": 0.5, "kv_groups": 0.5, "neurons": 0.5},
                   backend="greedy", progress=False).to_dict()
    assert {"name", "kind", "stage", "keep", "groups", "relative_loss"} <= set(report["layers"][0])
    assert any(layer["heldout_relative_loss"] is not None for layer in report["layers"])  # damp="auto"
    path = layer_plot(report, tmp_path / "layers.png")
    assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 5000
    bare = {"layers": [{key: layer[key] for key in ("name", "kind", "stage", "keep", "groups", "loss")}
                       for layer in report["layers"]]}  # no relative or held-out losses: raw losses drawn
    assert layer_plot(bare, tmp_path / "bare.png", title="raw").stat().st_size > 5000
    with pytest.raises(ValueError, match="report"):
        layer_plot({"layers": []}, tmp_path / "none.png")
