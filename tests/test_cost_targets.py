"""Global cost targets end to end on every tiny family: the allocation meets the MACs / parameter target
it predicts, cost tables are exact, non-uniformly pruned models save and reload, speed-up targets cache
their latency tables, and bad targets (API and CLI) are clean errors."""

from __future__ import annotations

import copy
import json
import math
import re
import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import osscar_opt
from osscar_opt import cli
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.budget import CostTarget
from osscar_opt.costs import StageCoster, cut_copy, model_cost
from osscar_opt.pipeline import PruneReport, prune
from tests.tiny_models import MODELS, build, calibration, images, is_vision, output

# The tiny ResNet-50 cannot go below 0.638 of its dense MACs by pruning channels (stem, downsample
# and classifier stay); the other families reach far less.
VALUE = {name: 0.8 if name == "resnet50" else 0.6 for name in MODELS}
# ResNet bottlenecks: conv2's input channels (conv1's outputs) and its output channels are two
# structures of one stage and conv2 costs k1 * k2 * 9 (* positions): the allocation measures that
# bilinear term (costs.StageCoster.interaction) so the prediction stays exact.


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread (OpenMP threads spinning on a busy 2-core machine made a prune 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data_of(name: str) -> torch.Tensor:
    return images(4) if is_vision(name) else calibration(name)  # 4 images / 12 x 10 tokens


def prune_options(name: str) -> dict:
    if is_vision(name):
        return {"backend": "magnitude", "batch_size": 4}
    return {"backend": "greedy", "batch_size": 6}


def first_batch(name: str) -> torch.Tensor:
    """The batch the pipeline measures costs on: its first calibration batch."""
    return data_of(name)[: prune_options(name)["batch_size"]]


def target_of(name: str, metric: str, value: float | None = None, **options) -> CostTarget:
    options.setdefault("normalize", "relative")
    if is_vision(name):  # coarse curves without swaps: the vision curves are the slow part
        options.setdefault("grid", 8)
        options.setdefault("curve_swaps", 0)
    if name == "mobilenet_v2":  # 3 of 48 hidden channels at least: see test_a_mobilenet_block_cut_to_one_channel_...
        options.setdefault("min_keep", 0.05)
    return CostTarget(metric, VALUE[name] if value is None else value, **options)


@dataclass
class Run:
    name: str
    metric: str
    value: float
    target: CostTarget
    dense: nn.Module
    model: nn.Module
    report: PruneReport

    @property
    def allocation(self) -> dict:
        return self.report.settings["allocation"]


_RUNS: dict[tuple, Run] = {}


def run_target(name: str, metric: str, value: float | None = None, **options) -> Run:
    """``name`` pruned (a deep copy) to ``value`` (default :data:`VALUE`) of ``metric``; each run is made
    once per session."""
    key = (name, metric, value, tuple(sorted(options.items())))
    if key not in _RUNS:
        dense = build(name)
        model = copy.deepcopy(dense)
        target = target_of(name, metric, value, **options)
        report = prune(model, data_of(name), target, progress=False, **prune_options(name))
        _RUNS[key] = Run(name, metric, target.value, target, dense, model, report)
    return _RUNS[key]


def measured_fraction(run: Run) -> float:
    batch = first_batch(run.name)
    return model_cost(run.model, batch, run.metric) / model_cost(run.dense, batch, run.metric)


def keeps_by_shape(run: Run) -> dict[tuple[str, int], set[int]]:
    """Kept counts of the structures of one kind and one dense size."""
    groups = {s.name: (s.kind, s.num_groups) for s in adapter_for(run.dense).structures()}
    result: dict[tuple[str, int], set[int]] = {}
    for name, keep in run.allocation["keep"].items():
        result.setdefault(groups[name], set()).add(keep)
    return result


def is_non_uniform(run: Run) -> bool:
    return any(len(keeps) > 1 for keeps in keeps_by_shape(run).values())


CASES = [
    pytest.param(name, metric, id=f"{name}-{metric}")
    for name in MODELS for metric in ("macs", "params")
]


# ------------------------------------------------------------------ the target is met
@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("name", MODELS)
def test_achieved_fraction_is_the_pruned_models_measured_cost(name, metric):
    run = run_target(name, metric)
    allocation = run.allocation
    assert allocation["target"] == metric and allocation["metric"] == metric and allocation["value"] == run.value
    assert allocation["normalize"] == "relative" and allocation["reallocate"] is False
    assert allocation["achieved_fraction"] == pytest.approx(measured_fraction(run), rel=1e-12)
    assert allocation["predicted_fraction"] <= run.value + 1e-12  # the allocation fits the capacity
    assert allocation["predicted_fraction"] > run.value - 0.02
    # The model has the allocated structure sizes, and every pruned layer was solved at its keep.
    sizes = {s.name: s.num_groups for s in adapter_for(run.model).structures()}
    assert {layer: sizes[layer] for layer in allocation["keep"]} == allocation["keep"]
    assert {record.name: record.keep for record in run.report.layers} == {
        layer: keep for layer, keep in allocation["keep"].items()
        if keep < {s.name: s.num_groups for s in adapter_for(run.dense).structures()}[layer]
    }
    assert all(len(record.kept) == record.keep for record in run.report.layers)


@pytest.mark.parametrize(("name", "metric"), CASES)
def test_prediction_is_exact_and_the_target_is_met(name, metric):
    run = run_target(name, metric)
    achieved = measured_fraction(run)
    assert run.allocation["predicted_fraction"] == pytest.approx(achieved, rel=1e-9)
    assert achieved <= run.value + 1e-12
    assert achieved >= run.value - 0.02


def test_the_allocation_is_not_uniform():
    runs = [run_target(name, metric) for name in MODELS for metric in ("macs", "params")]
    assert any(is_non_uniform(run) for run in runs)
    # Every family has a non-uniform allocation at one of its two targets.
    for name in MODELS:
        assert is_non_uniform(run_target(name, "macs")) or is_non_uniform(run_target(name, "params")), name


def test_cost_target_answers_from_its_allocation():
    run = run_target("bert", "macs")
    sizes = {s.name: s.num_groups for s in adapter_for(run.dense).structures()}
    for name, keep in run.allocation["keep"].items():
        kind = "heads" if "attention" in name else "neurons"
        assert run.target.keep(name, kind, sizes[name]) == (None if keep == sizes[name] else keep)
    assert run.target.keep("not.a.layer", "heads", 4) is None
    with pytest.raises(RuntimeError, match="no allocation yet"):
        CostTarget("macs", 0.5).keep("encoder.layer.0.output.dense", "neurons", 48)


# ------------------------------------------------------------------ cost tables
def stages_with_structures(adapter, batch: torch.Tensor, count: int = 2):
    """``(stage, hidden, call)`` of the first ``count`` stages that have structures."""
    hidden, calls = adapter.stage_inputs(adapter.calibration_batches(batch, batch.shape[0]))
    hidden, call = hidden[0], calls[0]
    found = []
    with torch.no_grad():
        for stage in adapter.stages():
            if stage.structures(stage.module):
                found.append((stage, hidden, call))
                if len(found) == count:
                    break
            hidden = adapter.run_stage(stage, hidden, call)
    return found


def stage_cost(adapter, stage, hidden, call, module: nn.Module, metric: str) -> int:
    if metric == "params":
        return sum(p.numel() for p in module.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        adapter.run_stage(stage, hidden, call, module)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", MODELS)
def test_macs_and_params_tables_are_exact(name):
    model = build(name)
    adapter = adapter_for(model)
    checked = 0
    for stage, hidden, call in stages_with_structures(adapter, first_batch(name)):
        for metric in ("macs", "params"):
            coster = StageCoster(adapter, stage, hidden, call, metric)
            full = stage_cost(adapter, stage, hidden, call, stage.module, metric)
            for position, structure in enumerate(stage.structures(stage.module)):
                n = structure.budget_groups  # q_heads: query heads per KV group
                keeps = sorted({1, max(1, n // 3), n // 2 + 1, n})
                table = coster.table(position, keeps)
                assert table[-1] == 0.0
                for keep, value in zip(keeps, table, strict=True):
                    cut = cut_copy(stage, position, keep)
                    assert stage.structures(cut)[position].budget_groups == keep
                    measured = stage_cost(adapter, stage, hidden, call, cut, metric) - full
                    assert value == pytest.approx(measured, rel=1e-12, abs=1e-6), (metric, structure.name, keep)
                    if keep < n:
                        assert value < 0
                checked += 1
    assert checked >= 4
    # cut_copy leaves the stage alone
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in build(name).state_dict().items()
    }


# ------------------------------------------------------------------ save and reload
@pytest.mark.parametrize("name", MODELS)
def test_non_uniformly_pruned_models_reload_with_identical_outputs(name, tmp_path):
    run = next((run for metric in ("macs", "params") if is_non_uniform(run := run_target(name, metric))), None)
    assert run is not None, "no non-uniform allocation to save"
    osscar_opt.save_pruned(run.model, tmp_path / "model")
    reloaded = osscar_opt.load_pruned(tmp_path / "model")
    assert type(reloaded) is type(run.model) and not reloaded.training
    data = data_of(name)[:3]
    assert torch.equal(output(reloaded, data), output(run.model, data))
    shapes = {k: tuple(v.shape) for k, v in run.model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in reloaded.state_dict().items()} == shapes
    sizes = {s.name: s.num_groups for s in adapter_for(reloaded).structures()}
    assert {layer: sizes[layer] for layer in run.allocation["keep"]} == run.allocation["keep"]


def test_a_mobilenet_block_cut_to_one_channel_can_be_saved(tmp_path):
    model = build("mobilenet_v2")
    prune(model, images(4), {"channels": 0.99}, backend="magnitude", batch_size=4, progress=False)
    assert model.features[2].conv[1][0].out_channels == 1
    osscar_opt.save_pruned(model, tmp_path / "model")
    reloaded = osscar_opt.load_pruned(tmp_path / "model")
    assert torch.equal(output(reloaded, images(2)), output(model, images(2)))


# ------------------------------------------------------------------ options
@pytest.mark.parametrize("name", ["bert", "llama", "mobilenet_v2"])
def test_reallocation_meets_the_target(name):
    run = run_target(name, "macs", reallocate=True)
    assert run.allocation["reallocate"] is True
    achieved = measured_fraction(run)
    assert run.allocation["achieved_fraction"] == pytest.approx(achieved, rel=1e-12)
    assert run.allocation["predicted_fraction"] == pytest.approx(achieved, rel=1e-9)
    assert run.value - 0.02 <= achieved <= run.value + 1e-12


@pytest.mark.parametrize("name", ["gpt2", "mobilenet_v2"])
def test_stage_normalization_weighs_curves_by_layer_over_stage_energy(name):
    run = run_target(name, "macs", normalize="stage")
    relative = run_target(name, "macs")
    assert run.allocation["normalize"] == "stage"
    weights = [curve["weight"] for curve in run.allocation["curves"]]
    assert all(0 < w < math.inf for w in weights) and len(set(weights)) > 1
    assert all(curve["weight"] == 1.0 for curve in relative.allocation["curves"])
    # The same curves, scaled: the relative values agree between the runs.
    for staged, plain in zip(run.allocation["curves"], relative.allocation["curves"], strict=True):
        assert staged["name"] == plain["name"] and staged["relative"] == pytest.approx(plain["relative"])
        assert staged["costs"] == plain["costs"]
    achieved = measured_fraction(run)
    assert run.allocation["predicted_fraction"] == pytest.approx(achieved, rel=1e-9)
    assert run.value - 0.02 <= achieved <= run.value + 1e-12


def test_curves_in_the_report_cover_every_structure_of_the_target_kinds():
    run = run_target("llama", "params")
    curves = run.allocation["curves"]
    structures = [s for s in adapter_for(run.dense).structures() if s.kind != "q_heads"]  # q_heads only when named
    assert [c["name"] for c in curves] == [s.name for s in structures]
    assert {c["kind"] for c in curves} == {"kv_groups", "neurons"}
    for curve, structure in zip(curves, structures, strict=True):
        assert curve["keeps"][-1] == curve["num_groups"] == structure.num_groups
        assert len(curve["keeps"]) == len(curve["relative"]) == len(curve["costs"])
        assert curve["costs"][-1] == 0.0 and all(c <= 0 for c in curve["costs"])
        assert run.allocation["keep"][curve["name"]] in curve["keeps"]


def test_kinds_and_min_keep_limit_the_allocation():
    run = run_target("gpt2", "params", 0.9, kinds=("neurons",), min_keep=0.5)
    allocation = run.allocation
    assert {curve["kind"] for curve in allocation["curves"]} == {"neurons"}
    assert all(record.kind == "neurons" for record in run.report.layers)
    assert all(keep >= 24 for keep in allocation["keep"].values())  # 48 neurons, min_keep 0.5
    assert allocation["predicted_fraction"] == pytest.approx(measured_fraction(run), rel=1e-9)


# ------------------------------------------------------------------ infeasible and bad targets
def test_a_target_keeps_an_eighth_of_every_structure_by_default():
    from osscar_opt.budget import DEFAULT_MIN_KEEP

    assert CostTarget("macs", 0.5).min_keep == DEFAULT_MIN_KEEP == 0.125
    run = run_target("gpt2", "macs", 0.45)  # deep enough that the allocation presses against the floor
    groups = {s.name: s.num_groups for s in adapter_for(run.dense).structures()}
    floors = {name: math.ceil(DEFAULT_MIN_KEEP * groups[name]) for name in run.allocation["keep"]}
    assert all(keep >= floors[name] for name, keep in run.allocation["keep"].items())
    assert run.allocation["min_keep"] == DEFAULT_MIN_KEEP and run.allocation["at_floor"]
    assert sorted(run.allocation["at_floor"]) == sorted(
        name for name, keep in run.allocation["keep"].items() if keep == floors[name])


def test_an_infeasible_target_names_min_keep_and_the_reachable_fraction():
    dense = build("bert")
    model = copy.deepcopy(dense)
    with pytest.raises(ValueError) as caught:
        prune(model, data_of("bert"), target_of("bert", "macs", 0.05, min_keep=0), progress=False,
              **prune_options("bert"))
    message = str(caught.value)
    assert message.startswith("target macs=0.05 cannot be met")
    assert "min_keep=0" in message and "'heads'" in message and "'neurons'" in message
    reachable = float(re.search(r"reaches only ([0-9.]+) of its dense macs", message).group(1))
    assert 0.05 < reachable < 0.6
    # Nothing was pruned.
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values(),
                                                 strict=True))
    # Just above the reachable fraction the target is met; min_keep raises the floor.
    model = copy.deepcopy(dense)
    report = prune(model, data_of("bert"), target_of("bert", "macs", reachable + 0.002, min_keep=0), progress=False,
                   **prune_options("bert"))
    assert report.settings["allocation"]["achieved_fraction"] <= reachable + 0.002
    with pytest.raises(ValueError, match=r"target macs=0.3 cannot be met: .*min_keep=0.5") as caught:
        prune(copy.deepcopy(dense), data_of("bert"), target_of("bert", "macs", 0.3, min_keep=0.5), progress=False,
              **prune_options("bert"))
    higher = float(re.search(r"reaches only ([0-9.]+) of", str(caught.value)).group(1))
    assert higher > reachable


def test_a_target_of_kinds_the_model_lacks_is_refused():
    with pytest.raises(ValueError, match="channels"):
        prune(build("bert"), data_of("bert"), CostTarget("macs", 0.5, kinds=["channels"]), progress=False)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("macs", 0), {}, "target macs: expected the fraction"),
        (("macs", 1.5), {}, "target macs: expected the fraction"),
        (("macs", -1), {}, "target macs: expected the fraction"),
        (("params", 0.0), {}, "target params: expected the fraction"),
        (("macs", float("nan")), {}, "target macs: expected a number"),
        (("macs", float("inf")), {}, "target macs: expected a number"),
        (("macs", True), {}, "target macs: expected a number"),
        (("macs", "0.5"), {}, "target macs: expected a number"),
        (("macs", None), {}, "target macs: expected a number"),
        (("speedup", 0.9), {}, "target speedup: expected a speed-up >= 1"),
        (("speedup", 0), {}, "target speedup: expected a speed-up >= 1"),
        (("flops", 0.5), {}, "metric: expected one of"),
        (("latency", 0.5), {}, "metric: expected one of"),
        (("macs", 0.5), {"kinds": ["heads", "filters"]}, "kinds: expected some of"),
        (("macs", 0.5), {"kinds": []}, "kinds: expected some of"),
        (("macs", 0.5), {"min_keep": 1.5}, "min_keep: expected a fraction in"),
        (("macs", 0.5), {"min_keep": -0.1}, "min_keep: expected a fraction in"),
        (("macs", 0.5), {"min_keep": True}, "min_keep: expected a fraction in"),
        (("macs", 0.5), {"grid": 1}, "grid: expected an integer >= 2"),
        (("macs", 0.5), {"grid": 8.0}, "grid: expected an integer >= 2"),
        (("macs", 0.5), {"normalize": "x"}, "normalize: expected one of"),
        (("macs", 0.5), {"curve_swaps": -1}, "curve_swaps: expected a non-negative integer"),
    ],
)
def test_bad_targets_are_value_errors_naming_the_argument(args, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CostTarget(*args, **kwargs)


def test_good_target_edges_are_accepted():
    assert CostTarget("macs", 1).value == 1.0
    assert CostTarget("params", 1e-6).capacity(200.0) == pytest.approx(2e-4)
    assert CostTarget("speedup", 1).capacity(3.0) == 3.0
    assert CostTarget("speedup", 2.0).capacity(3.0) == 1.5 and CostTarget("speedup", 2).cost_metric == "latency"
    target = CostTarget("macs", 0.5, kinds=["heads"], min_keep=1, grid=2)
    assert target.kinds() == {"heads"} and target.cost_metric == "macs"
    assert target.to_dict()["kinds"] == ["heads"] and target.to_dict()["min_keep"] == 1.0


# ------------------------------------------------------------------ speed-up targets
def parameter_timer(module, call):
    """A deterministic stand-in for wall time: runs the call, returns 1 ms per 1,000 parameters."""
    call()
    return 1e-3 * sum(p.numel() for p in module.parameters())


def counted(timer, counter: list):
    def timed(module, call):
        counter.append(1)
        return timer(module, call)

    return timed


def test_a_speedup_target_caches_its_latency_tables_and_revalidates_them(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSCAR_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "latency.json"
    dense = build("bert")
    first_calls: list = []
    report = prune(copy.deepcopy(dense), data_of("bert"),
                   target_of("bert", "speedup", 1.3, latency_timer=counted(parameter_timer, first_calls)),
                   progress=False, **prune_options("bert"))
    allocation = report.settings["allocation"]
    assert allocation["target"] == "speedup" and allocation["metric"] == "latency"
    assert allocation["predicted_fraction"] <= 1 / 1.3 + 1e-12
    assert allocation["achieved_speedup"] >= 1.3 and report.target_met  # the timer is exact here
    assert allocation["dense_cost"] > 0
    assert cache.exists()
    first = json.loads(cache.read_text())
    # Two identical blocks, two structures each: one table per structure position, shared by the blocks.
    assert len(first) == 2 and all(len(entry["points"]) >= 2 and entry["rounds"] >= 7 for entry in first.values())

    second_calls: list = []
    prune(copy.deepcopy(dense), data_of("bert"),
          target_of("bert", "speedup", 1.3, latency_timer=counted(parameter_timer, second_calls)),
          progress=False, **prune_options("bert"))
    assert json.loads(cache.read_text()) == first  # re-validated, not measured again
    assert len(second_calls) < len(first_calls) / 2

    monkeypatch.setenv("OSSCAR_CACHE", str(tmp_path / "other"))
    prune(copy.deepcopy(dense), data_of("bert"),
          target_of("bert", "speedup", 1.3, latency_cache=False, latency_timer=parameter_timer),
          progress=False, **prune_options("bert"))
    assert not (tmp_path / "other").exists()


def test_an_unreadable_latency_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSCAR_CACHE", str(tmp_path))
    (tmp_path / "latency.json").write_text("{not json")
    report = prune(build("opt"), data_of("opt"), target_of("opt", "speedup", 1.2, latency_timer=parameter_timer),
                   progress=False, **prune_options("opt"))
    assert report.settings["allocation"]["metric"] == "latency"
    assert len(json.loads((tmp_path / "latency.json").read_text())) == 2


# ------------------------------------------------------------------ the CLI
@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading or training a model fails the test: these refusals must come before."""
    from osscar_opt import models
    from osscar_opt.data import digits

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(digits, "digits_model", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-macs", "0.5", "--heads-sparsity", "0.5"], "--target-macs and --heads-sparsity"),
        (["--target-params", "0.5", "--neurons-sparsity", "0.25"], "--target-params and --neurons-sparsity"),
        (["--target-speedup", "1.5", "--heads-sparsity", "0.2"], "--target-speedup and --heads-sparsity"),
        (["--target-macs", "0"], "target macs: expected the fraction of the dense macs kept, in (0, 1]"),
        (["--target-params", "1.5"], "target params: expected the fraction"),
        (["--target-macs", "nan"], "target macs: expected a number"),
        (["--target-speedup", "0.9"], "target speedup: expected a speed-up >= 1"),
        (["--target-macs", "0.5", "--target-kinds", "heads,filters"], "kinds: expected some of"),
        (["--target-macs", "0.5", "--min-keep", "1.5"], "min_keep: expected a fraction in [0, 1]"),
        (["--min-keep", "0.2"], "--min-keep: applies only with --target-macs, --target-params or --target-speedup"),
        (["--target-kinds", "heads"], "--target-kinds: applies only with"),
        (["--reallocate"], "--reallocate: applies only with"),
        (["--heads-sparsity", "0.5", "--min-keep", "0.1"], "--min-keep: applies only with"),
    ],
)
def test_bad_transformer_target_flags_fail_before_loading_a_model(extra, message, no_model_loading, capsys):
    assert_refused_quickly(["prune", "--model", "/no/such/model/folder", "--quiet", *extra], message, capsys)


def assert_refused_quickly(argv: list[str], message: str, capsys) -> None:
    """The CLI exits with 2 and ``message`` within seconds (before any model is loaded or trained)."""
    start = time.perf_counter()
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - start < 10


def test_normalize_without_a_target_is_refused(no_model_loading, capsys):
    other = "relative" if CostTarget("macs", 0.5).normalize == "stage" else "stage"  # not the default
    assert cli.main(["prune", "--model", "/no/such/model/folder", "--quiet", "--normalize", other]) == 2
    assert "--normalize: applies only with" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-macs", "0.5", "--channels-sparsity", "0.3"], "--target-macs and --channels-sparsity"),
        (["--target-params", "0.5", "--channels-sparsity", "0.3"], "--target-params and --channels-sparsity"),
        (["--target-macs", "0.5", "--heads-sparsity", "0.3"], "--heads-sparsity / --neurons-sparsity"),
        (["--channels-sparsity", "0.3", "--reallocate"], "--reallocate: applies only with"),
        (["--target-speedup", "0.5"], "target speedup: expected a speed-up >= 1"),
    ],
)
def test_bad_torchvision_target_flags_fail_before_loading_a_model(extra, message, no_model_loading, capsys):
    assert_refused_quickly(["prune", "--model", "resnet18", "--quiet", *extra], message, capsys)


def test_torchvision_target_kinds_without_channels_fail_before_training(no_model_loading, capsys):
    argv = ["prune", "--model", "resnet18", "--quiet", "--target-macs", "0.5", "--target-kinds", "heads"]
    assert cli.main(argv) == 2
    assert "channels" in capsys.readouterr().err


def test_two_targets_at_once_are_refused_by_the_parser(no_model_loading, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["prune", "--model", "/no/such/model/folder", "--target-macs", "0.5", "--target-params", "0.5"])
    assert caught.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["prune", "--model", "/no/such/model/folder", "--target-macs", "0.5", "--normalize", "x"])


def test_the_keep_heat_map_shows_pruned_and_whole_structures(tmp_path):
    from osscar_opt.plots import keep_heatmap, kept_fractions

    model = build("bert")
    report = prune(model, data_of("bert"), CostTarget("macs", 0.6), backend="greedy", batch_size=6,
                   progress=False).to_dict()
    path = keep_heatmap(report, tmp_path / "keep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    allocation = report["settings"]["allocation"]
    whole = [c for c in allocation["curves"] if allocation["keep"][c["name"]] == c["num_groups"]]
    pruned = {layer["name"] for layer in report["layers"]}
    assert len(pruned) + len(whole) == len(allocation["curves"])
    _, _, cells = kept_fractions(report["layers"])
    assert all(0 < value <= 1 for value in cells.values())
