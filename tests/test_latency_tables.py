"""Latency tables that hold on a busy machine, and a missed target said loudly.

Wall time is replaced by timers built on the modules themselves (1 ms per 1,000 parameters, plus
noise and spikes where a test says so), so what is tested is the measuring procedure, not this
machine's load."""

from __future__ import annotations

import copy
import json
import random
import time

import pytest
import torch

from osscar_opt import cli
from osscar_opt.allocate import Choices, allocate
from osscar_opt.budget import CostTarget
from osscar_opt.costs import LatencyTable, LatencyTooNoisy, isotonic_increasing, wall_timer
from osscar_opt.evaluate import compare_latency, time_interleaved
from osscar_opt.pipeline import prune
from tests.test_cli_prune_eval_solve import tiny_bert_folder  # noqa: F401 - the shared fixture
from tests.tiny_models import build, calibration


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSCAR_CACHE", str(tmp_path / "cache"))


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def clean_timer(module, call):
    call()
    return 1e-3 * parameters(module)


def noisy_timer(seed: int = 0, jitter: float = 0.05, spikes: float = 0.2, spike_factor: float = 4.0):
    """Clean time with 5% jitter and, in 20% of the calls, a spike of 4x: a busy shared machine."""
    generator = random.Random(seed)

    def timer(module, call):
        value = clean_timer(module, call) * (1 + jitter * generator.gauss(0, 1))
        return value * spike_factor if generator.random() < spikes else value

    return timer


def target(timer, value: float = 1.3, **options) -> CostTarget:
    return CostTarget("speedup", value, normalize="relative", latency_timer=timer, **options)


def run(timer, value: float = 1.3, **options):
    model = build("llama")
    report = prune(model, calibration("llama"), target(timer, value, **options), backend="greedy", batch_size=6,
                   progress=False)
    return model, report


def curve_costs_and_losses(allocation: dict) -> dict[str, tuple[list[int], list[float], list[float]]]:
    tables = {}
    for curve in allocation["curves"]:
        losses, best = [], float("inf")
        for value in curve["relative"]:
            best = min(best, curve["weight"] * value)
            losses.append(best)
        tables[curve["name"]] = (curve["keeps"], curve["costs"], losses)
    return tables


def test_isotonic_fit_pools_adjacent_violators():
    assert isotonic_increasing([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic_increasing([-5.0, -1.0, -3.0, 0.0]) == [-5.0, -2.0, -2.0, 0.0]
    assert isotonic_increasing([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]


def test_paired_rounds_cancel_a_drift_that_hits_every_width_alike():
    points = [1, 2, 4]
    truth = [-3.0, -2.0, 0.0]
    drift = [0.0, 50.0, 5.0, 200.0, 10.0, 80.0, 1.0]  # the machine slows down and speeds up between rounds
    times = [[10.0 + t + slow for t in truth] for slow in drift]
    table = LatencyTable.from_times(points, times)
    assert table.savings == pytest.approx(truth) and max(table.spread) == pytest.approx(0.0)
    assert table.precise


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_noisy_timer_gives_a_monotone_table_and_an_allocation_within_two_percent_of_the_clean_one(seed, tmp_path,
                                                                                                   monkeypatch):
    _, clean = run(clean_timer)
    monkeypatch.setenv("OSSCAR_CACHE", str(tmp_path / "noisy"))
    _, noisy = run(noisy_timer(seed=seed, jitter=0.01, spikes=0.2))
    clean_allocation, noisy_allocation = clean.settings["allocation"], noisy.settings["allocation"]
    for curve in noisy_allocation["curves"]:
        assert curve["costs"] == sorted(curve["costs"]), f"{curve['name']}: a wider layer looks cheaper"
    # both allocations judged by the clean tables: the noisy one costs within 2% of the clean one, and
    # loses at most 2% more than the best allocation of the clean tables at its own cost
    tables = curve_costs_and_losses(clean_allocation)

    def cost_and_loss(keep: dict[str, int]) -> tuple[float, float]:
        cost = loss = 0.0
        for name, (keeps, costs, losses) in tables.items():
            index = keeps.index(keep.get(name, keeps[-1]))
            cost, loss = cost + costs[index], loss + losses[index]
        return clean_allocation["dense_cost"] + cost, loss

    clean_cost, _ = cost_and_loss(clean_allocation["keep"])
    noisy_cost, noisy_loss = cost_and_loss(noisy_allocation["keep"])
    choices = [Choices(name, "", keeps, losses, costs) for name, (keeps, costs, losses) in tables.items()]
    _, best_loss = cost_and_loss(allocate(choices, noisy_cost - clean_allocation["dense_cost"]))
    assert abs(noisy_cost - clean_cost) <= 0.02 * clean_cost
    assert noisy_loss <= best_loss * 1.02 + 1e-12


def test_timings_that_drown_the_differences_refuse_the_target_saying_why():
    generator = random.Random(0)

    def noise_only(module, call):  # no relation to the width at all
        call()
        return generator.uniform(1.0, 2.0)

    refusal = r"after 56 interleaved rounds.*too busy .* to tell the widths apart.*MACs or parameters"
    with pytest.raises(LatencyTooNoisy, match=refusal):
        run(noise_only)


def test_a_cached_table_that_no_longer_holds_is_measured_again(tmp_path):
    run(clean_timer)
    cache = tmp_path / "cache" / "latency.json"
    first = json.loads(cache.read_text())

    def twice_as_slow(module, call):
        return 2 * clean_timer(module, call)

    run(twice_as_slow)
    second = json.loads(cache.read_text())
    assert second.keys() == first.keys()
    for key in first:
        assert second[key]["savings"] == pytest.approx([2 * value for value in first[key]["savings"]])

    counter = []

    def counted(module, call):
        counter.append(1)
        return twice_as_slow(module, call)

    run(counted, latency_cache="refresh")  # measured again although the cache holds
    assert len(counter) > 2 * 7 * len(first)


def test_the_wall_timer_measures_what_a_call_takes():
    layer = torch.nn.Linear(4, 4)
    elapsed = wall_timer(layer, lambda: time.sleep(0.02))
    assert 15.0 <= elapsed <= 2000.0


def test_interleaved_rounds_rotate_the_first_call():
    order = []
    calls = [lambda name=name: order.append(name) for name in "abc"]
    time_interleaved(calls, rounds=3, warmup=0, measure=lambda call: call() or 0.0)
    assert order == list("abcbcacab")


def test_overlapping_latency_ranges_are_within_noise():
    values = iter([10.0, 9.0, 11.0, 10.5, 10.0, 9.5])  # dense, pruned, dense, pruned, ...
    same = compare_latency(lambda: None, lambda: None, rounds=3, measure=lambda call: next(values))
    assert same.within_noise
    values = iter([10.0, 5.0, 5.0, 10.0, 10.0, 5.0])  # rounds rotate: the pruned call starts round 2
    faster = compare_latency(lambda: None, lambda: None, rounds=3, measure=lambda call: next(values))
    assert not faster.within_noise and faster.speedup == pytest.approx(2.0)


def test_a_target_the_pruned_model_misses_is_said_in_the_report():
    def blocks_only(module, call):
        """Cut blocks look faster, but the whole model takes the same time whatever it holds."""
        call()
        return 50.0 if hasattr(module, "config") else clean_timer(module, call)

    _, report = run(blocks_only, min_keep=0)  # the tiny model reaches 1.3x only below the default floor
    allocation = report.settings["allocation"]
    assert report.target_met is False
    assert allocation["achieved_speedup"] == pytest.approx(1.0)
    assert "target speed-up 1.30x missed: measured 1.00x" in allocation["missed"]
    assert allocation["missed"] in report.summary()


def test_the_report_names_the_structures_left_at_their_floor():
    _, report = run(clean_timer, value=1.6, min_keep=0.25)
    allocation = report.settings["allocation"]
    floors = {curve["name"]: curve["keeps"][0] for curve in allocation["curves"]}
    expected = sorted(name for name, keep in allocation["keep"].items() if keep == floors[name])
    assert sorted(allocation["at_floor"]) == expected and expected
    assert all(keep >= 0.25 * curve["num_groups"] for curve in allocation["curves"]
               for name, keep in allocation["keep"].items() if name == curve["name"])


@pytest.fixture
def model_timers(monkeypatch):
    """The CLI's speed-up target timed by a timer under which the whole pruned model is no faster."""
    from osscar_opt import costs
    from osscar_opt.pipeline import allocation

    def blocks_only(module, call):
        call()
        return 50.0 if hasattr(module, "config") else clean_timer(module, call)

    monkeypatch.setattr(costs, "wall_timer", blocks_only)
    monkeypatch.setattr(allocation, "wall_timer", blocks_only)


def test_a_missed_target_warns_in_the_cli_and_fails_with_strict_target(tiny_bert_folder, model_timers,  # noqa: F811
                                                                      tmp_path, capsys):
    argv = ["prune", "--model", str(tiny_bert_folder), "--target-speedup", "1.3", "--samples", "8", "--seq-len",
            "16", "--batch-size", "4", "--backend", "greedy", "--quiet", "--no-eval"]
    assert cli.main(argv) == 0
    assert "warning: target speed-up 1.30x missed" in capsys.readouterr().out
    assert cli.main([*argv, "--strict-target", "--output", str(tmp_path / "model")]) == 4
    assert "--strict-target: target speed-up 1.30x missed" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_target_flags_need_a_target(capsys):
    assert cli.main(["prune", "--strict-target", "--quiet"]) == 2
    assert "--strict-target: applies only with" in capsys.readouterr().err
    assert cli.main(["prune", "--target-macs", "0.7", "--latency-cache", "refresh", "--quiet"]) == 2
    assert "--latency-cache: applies only with --target-speedup" in capsys.readouterr().err


def test_a_copy_of_the_dense_model_times_the_same_as_the_model():
    model = build("llama")
    dense = copy.deepcopy(model)
    ids = calibration("llama")[:2]
    comparison = compare_latency(lambda: clean_timer(dense, lambda: dense(ids)),
                                 lambda: clean_timer(model, lambda: model(ids)), rounds=3, measure=lambda c: c())
    assert comparison.speedup == pytest.approx(1.0) and comparison.within_noise

