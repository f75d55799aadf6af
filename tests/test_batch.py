"""Batches (osscar_opt.batch): one API, three executors, resumable results, worker deaths, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from osscar_opt import cli
from osscar_opt.batch import curves_many, solve_many
from osscar_opt.curves import loss_curve
from osscar_opt.executors import make_executor
from osscar_opt.executors.processes import ProcessExecutor
from tests.helpers import random_problem
from tests.test_cli_prune_eval_solve import tiny_bert_folder  # noqa: F401 - the shared fixture

HAS_RAY = __import__("importlib").util.find_spec("ray") is not None


def _problems(count: int = 3, groups: int = 12, outputs: int = 5) -> list:
    problems = []
    for index in range(count):
        problem = random_problem([2] * groups, outputs=outputs, seed=40 + index)
        problem.meta = {"name": f"layer.{index}", "kind": "neurons"}
        problems.append(problem)
    return problems


def _saved(tmp_path, problems) -> list:
    folder = tmp_path / "problems"
    folder.mkdir(exist_ok=True)
    for index, problem in enumerate(problems):
        problem.save(folder / f"{index}_{problem.meta['name']}.safetensors")
    return folder


def _essentials(rows: list[dict]) -> list[tuple]:
    return [(row["name"], row["backend"], row["keep"], tuple(row["support"]), row["loss"], row["status"])
            for row in rows]


def _slow_problems(count: int) -> list:
    """Problems whose local search takes a noticeable fraction of a second (so a kill lands mid-task)."""
    problems = []
    for index in range(count):
        problem = random_problem([1] * 260, outputs=40, seed=70 + index, rows=600, rank=40)
        problem.meta = {"name": f"wide.{index}", "kind": "neurons"}
        problems.append(problem)
    return problems


# ---------------------------------------------------------------- one API, the same rows on every executor


def test_rows_come_in_problem_backend_keep_order():
    problems = _problems(2)
    rows = solve_many(problems, [3, 5], ["greedy", "local-search"])
    assert [(row["name"], row["backend"], row["keep"]) for row in rows] == [
        (name, backend, keep) for name in ("layer.0", "layer.1") for backend in ("greedy", "local-search")
        for keep in (3, 5)]
    assert all(len(row["support"]) == row["keep"] and row["loss"] > 0 for row in rows)
    json.dumps(rows, allow_nan=False)  # plain data


def test_process_pool_gives_the_serial_rows_bit_for_bit(tmp_path):
    problems = _problems(3)
    serial = solve_many(problems, [4, 7], ["greedy", "local-search"], threads=1)
    pooled = solve_many(problems, [4, 7], ["greedy", "local-search"], executor="processes", workers=2, threads=1)
    assert _essentials(pooled) == _essentials(serial)
    from_files = solve_many(_saved(tmp_path, problems), [4, 7], ["greedy", "local-search"], executor="processes",
                            workers=2)
    assert _essentials(from_files) == _essentials(serial)
    assert len({row["worker"] for row in pooled}) >= 1


def test_loss_curves_spread_over_workers_match_the_serial_curves():
    problems = _problems(3)
    grids = [[2, 4, 6, 9, 12]] * 3
    rows = curves_many(problems, grids, [4, 4, 0], executor="processes", workers=2)
    for problem, grid, swaps, row in zip(problems, grids, [4, 4, 0], rows, strict=True):
        curve = loss_curve(problem, grid, swaps=swaps)
        assert row["relative"] == curve.relative
        assert [tuple(s) for s in row["supports"]] == curve.supports


# ---------------------------------------------------------------- resumable results


def test_a_rerun_with_the_results_file_skips_what_is_done(tmp_path):
    problems, results = _problems(2), tmp_path / "run.jsonl"
    ran = []
    first = solve_many(problems, [3, 6], "greedy", results=results, on_row=ran.append)
    assert len(ran) == 4
    ran.clear()
    again = solve_many(problems, [3, 6], "greedy", results=results, on_row=ran.append)
    assert ran == [] and again == first
    # more keeps on the same problems: only the new tasks run, and the file holds each task once
    more = solve_many(problems, [3, 6, 9], "greedy", results=results, on_row=ran.append)
    assert [row["keep"] for row in ran] == [9, 9] and len(more) == 6
    lines = results.read_text().splitlines()
    assert json.loads(lines[0])["format"] == "osscar_opt.batch"
    keys = [json.loads(line)["key"] for line in lines[1:]]
    assert len(keys) == len(set(keys)) == 6


def test_an_interrupted_batch_goes_on_where_it_stopped(tmp_path):
    problems, results = _problems(3), tmp_path / "run.jsonl"
    seen = []

    def stop_after_two(row):
        seen.append(row)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        solve_many(problems, [4], ["greedy", "local-search"], results=results, on_row=stop_after_two)
    assert len(results.read_text().splitlines()) == 1 + 2
    ran = []
    rows = solve_many(problems, [4], ["greedy", "local-search"], results=results, on_row=ran.append)
    assert len(ran) == 4 and len(rows) == 6
    assert _essentials(rows) == _essentials(solve_many(problems, [4], ["greedy", "local-search"]))


def test_a_torn_last_line_is_dropped_and_its_task_runs_again(tmp_path):
    problems, results = _problems(2), tmp_path / "run.jsonl"
    solve_many(problems, [3], "greedy", results=results)
    text = results.read_text()
    results.write_text(text[: len(text) - 40])  # the writer died mid-line
    ran = []
    rows = solve_many(problems, [3], "greedy", results=results, on_row=ran.append)
    assert len(ran) == 1 and len(rows) == 2
    assert all(json.loads(line) for line in results.read_text().splitlines())


def test_failed_tasks_are_recorded_and_run_again_on_a_rerun(tmp_path):
    problems, results = _problems(2, groups=6) + [_problems(1, groups=9)[0]], tmp_path / "run.jsonl"
    problems[2].meta = {"name": "layer.big", "kind": "neurons"}
    options = {"enumerate": {"max_subsets": 30}, "greedy": {}}
    rows = solve_many(problems, [3], ["enumerate", "greedy"], options=options, results=results,
                      executor="processes", workers=2)
    failed = [row for row in rows if row["status"] == "error"]
    assert [(row["name"], row["backend"]) for row in failed] == [("layer.big", "enumerate")]
    assert "max_subsets=30" in failed[0]["error"] and failed[0]["error_type"] == "ValueError"
    ran = []
    solve_many(problems, [3], ["enumerate", "greedy"], options=options, results=results, on_row=ran.append)
    assert [(row["name"], row["backend"], row["status"]) for row in ran] == [("layer.big", "enumerate", "error")]


def test_a_results_file_of_another_batch_or_not_a_batch_is_refused_untouched(tmp_path):
    results = tmp_path / "run.jsonl"
    solve_many(_problems(2), [3], "greedy", results=results)
    before = results.read_bytes()
    with pytest.raises(ValueError, match="results: .* holds the results of another batch"):
        solve_many(_problems(3), [3], "greedy", results=results)
    assert results.read_bytes() == before
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\n")
    with pytest.raises(ValueError, match="not an osscar_opt batch results file"):
        solve_many(_problems(2), [3], "greedy", results=foreign)
    assert foreign.read_text() == "my notes\n"


# ---------------------------------------------------------------- worker deaths


def test_a_killed_worker_process_is_replaced_and_every_result_is_there_once(tmp_path):
    problems, results = _slow_problems(4), tmp_path / "run.jsonl"
    executor = ProcessExecutor(workers=2)
    killed = []

    def kill_the_other_worker(row):
        if not killed:
            mine = int(row["worker"].rsplit(":", 1)[1])
            others = [pid for pid in executor.worker_pids() if pid != mine]
            if others:
                os.kill(others[0], signal.SIGKILL)
                killed.append(others[0])

    try:
        rows = solve_many(problems, [100, 180], "local-search", executor=executor, results=results,
                          on_row=kill_the_other_worker)
    finally:
        executor.close()
    assert killed and executor.restarts >= 1
    assert [row["status"] for row in rows] == ["heuristic"] * 8
    keys = [json.loads(line)["key"] for line in results.read_text().splitlines()[1:]]
    assert sorted(keys) == sorted(row["key"] for row in rows) and len(set(keys)) == 8
    # on the same thread count (one per worker here) the rows are the serial ones bit for bit
    assert _essentials(rows) == _essentials(solve_many(problems, [100, 180], "local-search", threads=1))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"workers": 0, "executor": "processes"}, "workers: expected a positive integer, got 0"),
        ({"executor": "threads"}, "executor: expected one of ['serial', 'processes', 'ray']"),
        ({"workers": 2}, "workers: the serial executor runs one task at a time"),
        ({"backends": ["greedy", "no-such"]}, "backend: unknown backend 'no-such'"),
        ({"backends": ["greedy", "greedy"]}, "names a backend twice"),
        ({"keeps": [3, 30]}, "keep: must be in [0, 12]"),
        ({"options": {"bogus": 1}}, "options: backend 'greedy' does not accept"),
        ({"address": "localhost:1"}, "address: only the 'ray' executor takes an address"),
    ],
)
def test_bad_batch_arguments_are_refused_before_any_task(arguments, message):
    arguments = {"keeps": [3], "backends": "greedy", **arguments}
    ran = []
    with pytest.raises(ValueError, match=re.escape(message)):
        solve_many(_problems(1), arguments.pop("keeps"), arguments.pop("backends"), on_row=ran.append, **arguments)
    assert ran == []


def test_the_same_problem_twice_is_refused():
    problem = _problems(1)[0]
    with pytest.raises(ValueError, match="are the same problem"):
        solve_many([problem, problem], [3], "greedy")


@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed")
def test_an_unreachable_ray_address_fails_fast_naming_it():
    begin = time.perf_counter()
    with pytest.raises(ValueError, match=r"address: cannot reach the Ray cluster at '127\.0\.0\.1:1'"):
        make_executor("ray", address="127.0.0.1:1")
    assert time.perf_counter() - begin < 10
    with pytest.raises(ValueError, match="address: expected 'auto', 'host:port' or 'ray://host:port'"):
        make_executor("ray", address="no-port-here")


# ---------------------------------------------------------------- the command line


def test_solve_command_runs_several_backends_and_keeps_on_workers_and_resumes(tmp_path, capsys):
    folder, results = _saved(tmp_path, _problems(2)), tmp_path / "run.jsonl"
    argv = ["solve", str(folder), "--backend", "greedy", "local-search", "--keep", "3", "5", "--workers", "2",
            "--results", str(results)]
    assert cli.main(argv + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["name"], row["backend"], row["keep"]) for row in rows][:4] == [
        ("layer.0", "greedy", 3), ("layer.0", "greedy", 5), ("layer.0", "local-search", 3),
        ("layer.0", "local-search", 5)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "0 run now, 8 read from" in out and "8 tasks" in out and "mean rel. loss" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workers", "0"], "--workers: expected a positive number of workers, got 0"),
        (["--executor", "threads"], "--executor: expected one of ['serial', 'processes', 'ray']"),
        (["--executor", "serial", "--workers", "2"], "--workers: the serial executor runs one task at a time"),
        (["--ray", "127.0.0.1:1"], "--ray: cannot reach the Ray cluster at '127.0.0.1:1'"),
    ],
)
def test_bad_worker_arguments_are_one_line_errors(tmp_path, capsys, extra, message):
    folder = _saved(tmp_path, _problems(1))
    if "--ray" in extra and not HAS_RAY:
        pytest.skip("ray is not installed")
    assert cli.main(["solve", str(folder), "--keep", "3", *extra]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- Ray, for real (a local cluster of 2 CPUs)


@pytest.fixture(scope="module")
def ray_cluster():
    if not HAS_RAY:
        pytest.skip("ray is not installed")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_tasks_give_the_serial_rows_and_curves(ray_cluster, tmp_path):
    problems = _problems(3)
    serial = solve_many(problems, [4, 7], ["greedy", "local-search"], threads=1)
    executor = make_executor("ray", workers=2)
    rows = solve_many(_saved(tmp_path, problems), [4, 7], ["greedy", "local-search"], executor=executor,
                      results=tmp_path / "ray.jsonl", threads=1)
    assert _essentials(rows) == _essentials(serial)
    curves = curves_many(problems, [[2, 5, 8]] * 3, [4] * 3, executor=executor)
    assert [row["relative"] for row in curves] == [loss_curve(p, [2, 5, 8], swaps=4).relative for p in problems]
    executor.close()
    assert ray_cluster.is_initialized()  # an executor does not shut down a cluster it did not start


@pytest.mark.slow
def test_a_killed_ray_worker_is_retried_and_every_result_is_there_once(ray_cluster, tmp_path):
    problems, results = _slow_problems(4), tmp_path / "ray.jsonl"
    killed = []

    def kill_a_worker(row):
        if not killed:
            pid = int(row["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    rows = solve_many(problems, [100, 180], "local-search", executor=make_executor("ray", workers=2),
                      results=results, on_row=kill_a_worker)
    assert killed
    assert [row["status"] for row in rows] == ["heuristic"] * 8
    keys = [json.loads(line)["key"] for line in results.read_text().splitlines()[1:]]
    assert len(keys) == len(set(keys)) == 8


# ---------------------------------------------------------------- a model's loss curves on workers


def test_a_cost_target_allocates_the_same_with_its_curves_on_workers():
    import torch

    from osscar_opt.budget import CostTarget
    from osscar_opt.pipeline import prune
    from tests.tiny_models import build, calibration

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run one thread each: the same sums, the same curves
    try:
        reports = {}
        for executor in (None, "processes"):
            model = build("llama")
            reports[executor] = prune(model, calibration("llama"), CostTarget("params", 0.7), progress=False,
                                      executor=executor, workers=2 if executor else None)
    finally:
        torch.set_num_threads(threads)
    serial, spread = reports[None], reports["processes"]
    assert spread.settings["allocation"]["keep"] == serial.settings["allocation"]["keep"]
    assert [(r.name, r.kept, r.loss) for r in spread.layers] == [(r.name, r.kept, r.loss) for r in serial.layers]
    assert spread.settings["curve_executor"] == "processes (2 workers)"


def test_workers_without_a_cost_target_are_refused():
    from osscar_opt.pipeline import prune
    from tests.tiny_models import budgets, build, calibration

    with pytest.raises(ValueError, match="executor: only a CostTarget computes loss curves"):
        prune(build("llama"), calibration("llama"), budgets("llama", 0.5), workers=2, progress=False)


def test_prune_command_spreads_a_target_s_loss_curves_over_workers(tiny_bert_folder, tmp_path, capsys):  # noqa: F811
    report = tmp_path / "report.json"
    argv = ["prune", "--model", str(tiny_bert_folder), "--target-macs", "0.8", "--samples", "8", "--seq-len", "16",
            "--batch-size", "4", "--quiet", "--no-eval", "--damp", "0.01", "--workers", "2", "--report", str(report)]
    assert cli.main(argv) == 0
    settings = json.loads(report.read_text())["settings"]
    assert settings["curve_executor"] == "processes (2 workers)" and settings["allocation"]["keep"]
    argv = ["prune", "--model", str(tiny_bert_folder), "--quiet", "--no-eval", "--workers", "2"]
    assert cli.main(argv) == 2
    assert "--workers: applies only with --target-macs" in capsys.readouterr().err


def test_a_single_worker_pool_is_kept_between_tasks():
    executor = ProcessExecutor(workers=1)
    try:
        rows = solve_many(_problems(2), [3, 5], "greedy", executor=executor)
        assert executor.restarts == 0 and len({row["worker"] for row in rows}) == 1
    finally:
        executor.close()
