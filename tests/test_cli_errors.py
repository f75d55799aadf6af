"""The ``osscar`` error boundary: one line and an exit code per error class, checks before any work,
and batches (solve, certify) that survive one bad item."""

from __future__ import annotations

import importlib
import json
import os
import random
import time

import pytest
import torch

from osscar_opt import cli, solving
from osscar_opt.commands import certify as certify_command
from osscar_opt.commands import solve as solve_command
from tests.helpers import random_problem
from tests.test_cost_targets import no_model_loading  # noqa: F401 - a fixture

CERTIFY_QUICK = ["--heuristic", "greedy", "--backend", "none", "--iterations", "5", "--time-limit", "10"]


def one_error_line(err: str, command: str) -> str:
    """The single stderr line of an error (no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"osscar {command}: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def problems(tmp_path):
    """A folder with two good saved problems (keep 3 of 6 groups) and one corrupt file between them."""
    folder = tmp_path / "problems"
    folder.mkdir()
    for index, name in ((0, "layer.a"), (2, "layer.c")):
        problem = random_problem([2] * 6, outputs=3, seed=index)
        problem.keep = 3
        problem.meta["name"] = name
        problem.save(folder / f"{index}_{name}.safetensors")
    (folder / "1_corrupt.safetensors").write_bytes(random.Random(0).randbytes(512))  # random bytes: not a problem
    return folder


@pytest.fixture
def no_work(no_model_loading, monkeypatch):  # noqa: F811 - the imported fixture
    """Loading a model, a problem file, or solving fails the test: refusals must come before."""
    from osscar_opt.problem import LayerProblem

    def refuse(*args, **kwargs):
        raise AssertionError("work was done before the arguments were checked")

    monkeypatch.setattr(LayerProblem, "load", refuse)
    monkeypatch.setattr(certify_command, "certify_rows", refuse)


def refused_quickly(argv: list[str], message: str, capsys, command: str) -> None:
    start = time.perf_counter()
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err, command)
    assert message in line, line
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------- 1. one error boundary


class GurobiError(Exception):
    """Stands in for gurobipy.GurobiError (a plain Exception subclass from the gurobipy package)."""


GurobiError.__module__ = "gurobipy._exception"


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        (ValueError("keep: bad"), 2, "osscar solve: error: keep: bad"),
        (PermissionError(13, "Permission denied", "/x/report.json"), 3, "Permission denied: '/x/report.json'"),
        (RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"), 4,
         "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB (--debug shows the traceback)"),
        (GurobiError("Model too large for size-limited license"), 4,
         "GurobiError: Model too large for size-limited license"),
        (TypeError("'>' not supported"), 1, "TypeError: '>' not supported (unexpected error; re-run with --debug"),
    ],
)
def test_any_error_is_one_line_with_an_exit_code_by_its_class(monkeypatch, capsys, error, code, text):
    def fail(args):
        raise error

    monkeypatch.setattr(solve_command, "run", fail)
    assert cli.main(["solve", "somewhere"]) == code
    assert text in one_error_line(capsys.readouterr().err, "solve")


def test_debug_before_or_after_the_command_re_raises_with_the_traceback(monkeypatch):
    def fail(args):
        raise RuntimeError("solver crashed")

    monkeypatch.setattr(solve_command, "run", fail)
    with pytest.raises(RuntimeError, match="solver crashed"):
        cli.main(["--debug", "solve", "somewhere"])
    with pytest.raises(RuntimeError, match="solver crashed"):
        cli.main(["solve", "somewhere", "--debug"])


def test_ctrl_c_exits_130_with_one_line_saying_nothing_was_saved(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(solve_command, "run", interrupted)
    assert cli.main(["solve", "somewhere"]) == 130
    assert one_error_line(capsys.readouterr().err, "solve") == "osscar solve: interrupted; nothing was saved"


def test_ctrl_c_in_a_batch_prints_the_rows_done_and_says_so(problems, monkeypatch, capsys):
    real, calls = solving.solve, []

    def solve_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(solving, "solve", solve_then_interrupt)
    assert cli.main(["solve", str(problems), "--backend", "greedy"]) == 130
    out, err = capsys.readouterr()
    assert "layer.a" in out and "layer.c" not in out  # the row done before Ctrl-C is not lost
    assert "interrupted; 2 of 3 problems were done (printed above)" in one_error_line(err, "solve")


def test_the_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for code in (0, 1, 2, 3, 4, 5, 130):
        assert any(line.split()[:1] == [str(code)] for line in out.splitlines()), code


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("time_limit=5s", "--backend-option time_limit: expected a positive number of seconds, got '5s'"),
        ("seed=18446744073709551616", "--backend-option seed: expected an integer in [-2**63, 2**64)"),
        ("stages=two", "--backend-option stages: expected an integer, got 'two'"),
        ("no_such_option=1", "options: backend 'local-search' does not accept ['no_such_option']"),
    ],
)
def test_bad_backend_option_values_are_input_errors_naming_the_option(no_work, capsys, tmp_path, option, message):
    refused_quickly(["solve", str(tmp_path), "--backend-option", option], message, capsys, "solve")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["prune", "--quiet"], ["eval", "somewhere"]])
def test_a_missing_gpu_is_refused_by_the_parser_before_any_work(no_work, capsys, command):
    with pytest.raises(SystemExit) as caught:
        cli.main([*command, "--device", "cuda"])
    assert caught.value.code == 2
    assert "argument --device: 'cuda': no CUDA GPU is available on this machine" in capsys.readouterr().err


# ---------------------------------------------------------------- 2. checks before any work


def prune_argv(*extra: str) -> list[str]:
    return ["prune", "--model", "/no/such/model/folder", "--quiet", "--no-eval", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--report", "{dir}"), "--report: {dir} is a folder; expected a file path"),
        (("--report", "{file}/report.json"), "--report: cannot create {file}/report.json: {file} is a file"),
        (("--output", "{file}"), "--output: {file} exists and is not a folder"),
        (("--output", "{file}/model"), "--output: cannot create {file}/model: {file} is a file"),
        (("--save-problems", "{file}"), "--save-problems: {file} exists and is not a folder"),
        (("--save-problems", "{file}/deeper/problems"), "--save-problems: cannot create"),
        (("--report", "{dir}/r.json", "--plot"), "--plot (the report's .layers.png): {dir}/r.layers.png is a folder"),
        (("--backend", "greedy", "--backend-option", "time_limit=1"),
         "options: backend 'greedy' does not accept ['time_limit']"),
        (("--backend", "enumerate", "--backend-option", "max_subsets=many"), "max_subsets: expected an integer"),
        (("--backend", "magnitude", "--backend-option", "seed=1"), "backend 'magnitude' does not accept ['seed']"),
        (("--backend-option", "oops"), "backend_option: expected key=value, got 'oops'"),
    ],
)
def test_prune_refuses_bad_outputs_and_backend_options_before_loading_a_model(no_work, capsys, tmp_path, extra,
                                                                              message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "r.layers.png").mkdir()
    (tmp_path / "file").write_text("x")
    where = {"dir": tmp_path / "dir", "file": tmp_path / "file"}
    argv = prune_argv(*(item.format(**where) for item in extra))
    refused_quickly(argv, message.format(**where), capsys, "prune")


def test_prune_refuses_a_report_in_a_read_only_folder_before_loading_a_model(no_work, capsys, tmp_path,
                                                                             monkeypatch):
    from osscar_opt.commands import options

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    # works as root too (root may write anywhere): the folder is reported as not writable
    monkeypatch.setattr(options.os, "access", lambda path, mode: str(path) != str(locked) and real(path, mode))
    message = f"--report: cannot write {locked}/sub/report.json: folder {locked} is not writable"
    refused_quickly(prune_argv("--report", str(locked / "sub" / "report.json")), message, capsys, "prune")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--json", "{dir}"), "--json: {dir} is a folder; expected a file path"),
        (("--plot", "{file}/gap.png"), "--plot: cannot create {file}/gap.png: {file} is a file"),
        (("--heuristic", "no-such-backend"), "--heuristic: unknown backend 'no-such-backend'"),
        (("--backend", "enumerate", "--backend-option", "nope=1"), "backend 'enumerate' does not accept ['nope']"),
        (("--backend", "gurobi:no-such-form"), "--backend gurobi:no-such-form: formulation: expected one of"),
        (("--backend-option", "rel_gap=big"), "--backend-option rel_gap: expected a number in [0, 1)"),
    ],
)
def test_certify_refuses_bad_outputs_and_backends_before_solving(no_work, capsys, tmp_path, extra, message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    where = {"dir": tmp_path / "dir", "file": tmp_path / "file"}
    argv = ["certify", str(tmp_path), "--keep", "2", *(item.format(**where) for item in extra)]
    refused_quickly(argv, message.format(**where), capsys, "certify")


# ---------------------------------------------------------------- 3. batches survive one bad item


def test_solve_reports_a_corrupt_problem_file_and_solves_the_others(problems, capsys):
    assert cli.main(["solve", str(problems), "--backend", "greedy"]) == 5
    out, err = capsys.readouterr()
    table = out.splitlines()
    assert any(line.startswith("layer.a") and "heuristic" in line for line in table)
    assert any(line.startswith("layer.c") and "heuristic" in line for line in table)
    assert any(line.startswith("1_corrupt") and "error" in line for line in table)
    assert any(line.startswith("error 1_corrupt.safetensors: ") and "not a readable" in line for line in table)
    assert table[-1].startswith("3 problems (1 failed)")
    assert one_error_line(err, "solve") == "osscar solve: error: 1 of 3 problems failed: 1_corrupt.safetensors"

    assert cli.main(["solve", str(problems), "--backend", "greedy", "--json"]) == 5
    rows = json.loads(capsys.readouterr().out)
    assert [(row["file"], row["status"]) for row in rows] == [
        ("0_layer.a.safetensors", "heuristic"), ("1_corrupt.safetensors", "error"),
        ("2_layer.c.safetensors", "heuristic")]
    assert rows[1]["keep"] is None and "not a readable" in rows[1]["error"]
    assert all(row["loss"] > 0 for row in rows if row["status"] != "error")


def test_solve_records_a_failing_solve_and_goes_on(problems, monkeypatch, capsys):
    (problems / "1_corrupt.safetensors").unlink()
    real = solving.solve

    def fail_on_the_first(problem, keep, backend, **options):
        if problem.meta["name"] == "layer.a":
            raise GurobiError("Model too large for size-limited license")
        return real(problem, keep, backend, **options)

    monkeypatch.setattr(solving, "solve", fail_on_the_first)
    assert cli.main(["solve", str(problems), "--backend", "greedy", "--json"]) == 5
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [(row["name"], row["keep"], row["status"]) for row in rows] == [
        ("layer.a", 3, "error"), ("layer.c", 3, "heuristic")]
    assert rows[0]["error"] == "GurobiError: Model too large for size-limited license"
    assert "1 of 2 problems failed" in one_error_line(err, "solve")


def test_certify_reports_a_corrupt_problem_file_and_certifies_the_others(problems, tmp_path, capsys):
    out = tmp_path / "rows" / "rows.json"
    assert cli.main(["certify", str(problems), *CERTIFY_QUICK, "--json", str(out)]) == 5
    text, err = capsys.readouterr()
    lines = text.splitlines()
    assert any(line.startswith("layer.a ") for line in lines) and any(line.startswith("layer.c ") for line in lines)
    assert any(line.startswith("error 1_corrupt.safetensors: ") for line in lines)
    assert max(len(line) for line in lines) <= 100
    assert "1 of 3 rows failed (1_corrupt.safetensors)" in one_error_line(err, "certify")
    rows = json.loads(out.read_text())
    assert [(row["file"], row["keep"], row.get("status")) for row in rows] == [
        ("0_layer.a.safetensors", 3, None), ("1_corrupt.safetensors", None, "error"),
        ("2_layer.c.safetensors", 3, None)]
    assert all(row["bound"] <= row["heuristic_loss"] for row in rows if "status" not in row)


def test_certify_records_a_failing_keep_and_goes_on(problems, tmp_path, monkeypatch, capsys):
    certify_module = importlib.import_module("osscar_opt.certify")  # the package exports a function of that name

    (problems / "1_corrupt.safetensors").unlink()
    real = certify_module.certify

    def fail_at_keep_3(problem, found, **options):
        if len(found.support) == 3 and problem.meta["name"] == "layer.c":
            raise RuntimeError("relaxation diverged")
        return real(problem, found, **options)

    monkeypatch.setattr(certify_module, "certify", fail_at_keep_3)
    out = tmp_path / "rows.json"
    assert cli.main(["certify", str(problems), "--keep", "2", "3", *CERTIFY_QUICK, "--json", str(out)]) == 5
    text, err = capsys.readouterr()
    assert "error 2_layer.c.safetensors keep 3: RuntimeError: relaxation diverged" in text
    rows = json.loads(out.read_text())
    assert [(row["name"], row["keep"], row.get("status")) for row in rows] == [
        ("layer.a", 2, None), ("layer.a", 3, None), ("layer.c", 2, None), ("layer.c", 3, "error")]
    assert "1 of 4 rows failed (2_layer.c.safetensors)" in one_error_line(err, "certify")
