"""What `osscar prune` and `osscar solve` print can be trusted: the latency row is timed
interleaved with its speed-up and noise stated, where the problems went and how big they are,
readable report summaries, per-backend totals, and a collapse said on its own line."""

from __future__ import annotations

import json

import pytest

from osscar_opt import cli, evaluate
from osscar_opt.pipeline import PruneReport, prune
from tests.test_cli_prune_eval_solve import tiny_bert_folder  # noqa: F401 - the shared fixture
from tests.tiny_models import build, calibration


@pytest.fixture(scope="module")
def printed(tiny_bert_folder, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("printed")
    argv = ["prune", "--model", str(tiny_bert_folder), "--heads-sparsity", "0.5", "--neurons-sparsity", "0.5",
            "--samples", "8", "--seq-len", "16", "--batch-size", "4", "--backend", "greedy",
            "--report", str(out / "report.json"), "--save-problems", str(out / "problems")]
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(argv) == 0
    return out, stdout.getvalue()


def test_the_latency_row_times_dense_and_pruned_interleaved(printed):
    out, text = printed
    assert "speed-up, dense / pruned" in text
    assert "rounds timing the dense and the pruned model interleaved" in text
    comparison = json.loads((out / "report.json").read_text())["pruned"]["latency_comparison"]
    assert comparison["rounds"] == evaluate.COMPARISON_ROUNDS
    low, high = comparison["speedup_range"]
    assert low <= comparison["speedup"] <= high
    if comparison["within_noise"]:
        assert "(within noise)" in text


def test_save_problems_says_where_and_how_much(printed):
    out, text = printed
    size = sum(path.stat().st_size for path in (out / "problems").glob("*.safetensors"))
    assert f"wrote 4 layer problems ({size / 1e6:.1f} MB) to {out / 'problems'}" in text


def test_a_report_has_a_readable_summary_and_a_short_repr():
    report = prune(build("llama"), calibration("llama"), {"kv_groups": 0.5, "neurons": 0.5}, backend="greedy",
                   damp=0.01, batch_size=6, progress=False)
    summary = report.summary()
    assert summary.splitlines()[0].startswith("llama: 4 layers pruned with greedy in ")
    assert "kv_groups: 2 layers, kept 50%-50% of their groups, mean relative loss" in summary
    assert "neurons: 2 layers, kept 50%-50%" in summary
    assert repr(report).startswith("PruneReport(4 layers, backend='greedy', budgets=")
    assert len(repr(report)) < 200 and str(report.layers[0].kept) not in repr(report)
    assert report.target_met is None and PruneReport().target_met is None


def test_solve_totals_each_backend_and_keep_apart(printed, capsys):
    out, _ = printed
    argv = ["solve", str(out / "problems"), "--backend", "greedy", "magnitude", "--keep", "1", "2"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "16 tasks; totals per backend and keep:" in text
    for backend in ("greedy", "magnitude"):
        for keep in (1, 2):
            assert f"  {backend}, keep {keep}: 4 problems, total loss " in text
    assert "total loss" not in text.split("16 tasks")[0].splitlines()[-1]


def test_a_collapse_is_said_on_its_own_line():
    assert evaluate.collapse_warning({"perplexity": 70.0}, {"perplexity": 448.0}).startswith(
        "warning: quality collapsed: perplexity 448.00 against 70.00 dense (6.4x")
    assert evaluate.collapse_warning({"perplexity": 70.0}, {"perplexity": 150.0}) is None
    assert "cosine" in evaluate.collapse_warning({}, {"cosine_to_dense": 0.3})
    assert evaluate.collapse_warning({}, {"cosine_to_dense": 0.9}) is None


def test_a_collapse_under_a_cost_target_advises_the_target_and_the_floor():
    from types import SimpleNamespace

    from osscar_opt.commands.targets import collapse_advice

    speedup = SimpleNamespace(settings={"allocation": {"target": "speedup", "min_keep": 0.125}})
    line = evaluate.collapse_warning({"perplexity": 17.8}, {"perplexity": 227.2}, collapse_advice(speedup))
    assert line.endswith("ask for a smaller speed-up, or raise --min-keep (now 0.125) if structures sit at their floor")
    macs = SimpleNamespace(settings={"allocation": {"target": "macs", "min_keep": 0.0}})
    assert collapse_advice(macs).startswith("ask for a larger fraction, or raise --min-keep (now 0)")
    assert collapse_advice(SimpleNamespace(settings={})) == evaluate.COLLAPSE_ADVICE
