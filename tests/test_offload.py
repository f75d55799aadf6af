"""``prune(..., offload=True)``: the model and the cached activations stay on the offload device,
one stage at a time runs on the compute device, and the result is the one without offload.

No GPU is needed: on the CPU the compute and offload devices are the same, so the result must be
bit-identical; and a *dtype-tagged* placement stands in for two devices (compute = float32,
offload = float64, so a tensor's dtype says where it is and a forgotten move either fails in a
matmul or changes the numbers). Where CUDA is available the real CPU -> GPU path runs too.
"""

from __future__ import annotations

import json

import pytest
import torch

from osscar_opt import cli
from osscar_opt.adapters.base import ModelAdapter, StageCall, map_tensors, to_device
from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.budget import CostTarget
from osscar_opt.oneshot import oneshot
from osscar_opt.pipeline import placement, prune, prune_vision, settings
from osscar_opt.pipeline import stage as stage_module
from tests.test_cli_prune_eval_solve import tiny_bert_folder  # noqa: F401 - the shared fixture
from tests.tiny_models import budgets, build, calibration, is_vision

MODELS = ("bert", "llama", "resnet50")
COMPUTE = ("cpu", *(("cuda",) if torch.cuda.is_available() else ()))


def _backend(name: str) -> str:
    """The default local search for the transformers; greedy for the (32-structure) ResNet, to keep it quick."""
    return "greedy" if is_vision(name) else "local-search"


def _pruned(name: str, offload: bool, budget=None, **options):
    model = build(name)
    report = prune(model, calibration(name), budget or budgets(name, 0.5), offload=offload, progress=False,
                   batch_size=4, backend=_backend(name), **options)
    return model, report


def _same_records(first, second) -> None:
    assert len(first.layers) == len(second.layers) > 0
    for a, b in zip(first.layers, second.layers, strict=True):
        assert (a.name, a.keep, a.kept) == (b.name, b.keep, b.kept)
        assert (a.loss, a.dense_loss, a.relative_loss, a.damp) == (b.loss, b.dense_loss, b.relative_loss, b.damp)
        assert a.heldout_relative_loss == b.heldout_relative_loss


def _same_weights(model, reference) -> None:
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].shape == value.shape, key
        assert torch.equal(state[key].to(value.dtype), value), key


@pytest.mark.parametrize("name", MODELS)
def test_offload_on_cpu_prunes_the_same_model(name):
    reference, expected = _pruned(name, offload=False)
    model, report = _pruned(name, offload=True)
    _same_records(report, expected)
    _same_weights(model, reference)
    assert report.settings["offload"] is True and expected.settings["offload"] is False
    assert report.settings["device"] == expected.settings["device"] == "cpu"


def test_offload_on_cpu_is_the_same_with_dense_targets_and_a_fixed_ridge():
    reference, expected = _pruned("llama", offload=False, target="dense-output", damp=0.01)
    model, report = _pruned("llama", offload=True, target="dense-output", damp=0.01)
    _same_records(report, expected)
    _same_weights(model, reference)


def test_offload_on_cpu_allocates_a_cost_target_the_same_way():
    reference, expected = _pruned("llama", offload=False, budget=CostTarget("params", 0.7))
    model, report = _pruned("llama", offload=True, budget=CostTarget("params", 0.7))
    assert report.settings["allocation"]["keep"] == expected.settings["allocation"]["keep"]
    _same_records(report, expected)
    _same_weights(model, reference)


# ----------------------------------------------------------------- two devices, simulated by dtype


COMPUTE_DTYPE, STORAGE_DTYPE = torch.float32, torch.float64


class DtypeTaggedPlacement(placement.Placement):
    """Compute = float32, offload = float64, both on the CPU: float32 -> float64 -> float32 is
    exact, so a correct offloaded run is bit-identical to a float32 run without offload."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"), torch.device("cpu"), True)

    def _to_compute(self, tensor):
        return tensor.to(COMPUTE_DTYPE) if tensor.is_floating_point() else tensor

    def _to_storage(self, tensor):
        return tensor.to(STORAGE_DTYPE) if tensor.is_floating_point() else tensor


def _floating(value) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_tensors(value, lambda t: found.append(t) or t)
    return [t for t in found if t.is_floating_point()]


def _dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()}


def _tag(monkeypatch) -> list[str]:
    """From now on, prune with the dtype-tagged placement and check, at every stage run, that the
    module run and its inputs are on the compute side and every other stage on the offload side;
    and, around every stage, that the cached activations (inputs, call arguments, dense targets,
    outputs) are on the offload side. Returns the names of the checked stage runs (appended to)."""
    monkeypatch.setattr(settings, "placement_for", lambda model, device, offload: DtypeTaggedPlacement())
    runs: list[str] = []
    run_stage = ModelAdapter.run_stage

    def checked_run_stage(self, stage, hidden, call, module=None):
        running = module or stage.module
        assert hidden.dtype == COMPUTE_DTYPE
        assert all(t.dtype == COMPUTE_DTYPE for t in _floating(call))
        assert _dtypes(running) == {COMPUTE_DTYPE}
        running_parameters = {id(p) for p in running.parameters()}
        for other in self.stages():  # the stem of a ResNet is a new Sequential each time: compare parameters
            if not running_parameters & {id(p) for p in other.module.parameters()}:
                assert _dtypes(other.module) <= {STORAGE_DTYPE}, f"{other.name} is on the compute device"
        runs.append(stage.name)
        output = run_stage(self, stage, hidden, call, module)
        assert output.dtype == COMPUTE_DTYPE
        return output

    def on_storage(*values):
        for value in values:
            assert all(t.dtype == STORAGE_DTYPE for t in _floating(value))

    stage_run = stage_module.StagePruner.run

    def checked_stage_run(self, dense_in, pruned_in, calls):
        on_storage(dense_in, pruned_in, calls)
        assert _dtypes(self.adapter.model) == {STORAGE_DTYPE}
        records, dense_out, pruned_out = stage_run(self, dense_in, pruned_in, calls)
        on_storage(dense_out, pruned_out)
        assert _dtypes(self.adapter.model) == {STORAGE_DTYPE}, "a stage stayed on the compute device"
        return records, dense_out, pruned_out

    stage_inputs = TransformerAdapter.stage_inputs

    def checked_stage_inputs(self, batches):
        # the embeddings (and whatever else no stage holds) on the compute side, the blocks not
        for module in self.outside_stages():
            own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            assert {t.dtype for t in own if t.is_floating_point()} <= {COMPUTE_DTYPE}, type(module).__name__
        for stage in self.stages():
            assert _dtypes(stage.module) == {STORAGE_DTYPE}
        return stage_inputs(self, batches)

    calibrate = stage_module.StagePruner.calibrate

    def checked_calibrate(self, structure, pruned_in, calls, targets):
        on_storage(targets)
        return calibrate(self, structure, pruned_in, calls, targets)

    monkeypatch.setattr(ModelAdapter, "run_stage", checked_run_stage)
    monkeypatch.setattr(stage_module.StagePruner, "run", checked_stage_run)
    monkeypatch.setattr(stage_module.StagePruner, "calibrate", checked_calibrate)
    monkeypatch.setattr(TransformerAdapter, "stage_inputs", checked_stage_inputs)
    return runs


@pytest.mark.parametrize(("name", "target"), [("bert", None), ("llama", None), ("llama", "dense-output"),
                                              ("resnet50", None)])
def test_offload_keeps_the_model_and_cached_activations_on_the_offload_device(monkeypatch, name, target):
    reference, expected = _pruned(name, offload=False, target=target)
    tagged = _tag(monkeypatch)
    model = build(name).to(STORAGE_DTYPE)  # the model starts on the offload device
    report = prune(model, calibration(name), budgets(name, 0.5), offload=True, progress=False, batch_size=4,
                   target=target, backend=_backend(name))
    assert len(tagged) > 0  # every stage run was checked
    assert _dtypes(model) == {STORAGE_DTYPE}  # the pruned model ends on the offload device
    _same_records(report, expected)
    _same_weights(model, reference)


# ----------------------------------------------------------------- a real compute device


@pytest.mark.parametrize("compute", COMPUTE)
@pytest.mark.parametrize("name", ["llama", "resnet50"])
def test_offload_to_a_compute_device_leaves_the_model_on_the_cpu(name, compute):
    reference = build(name).to(compute)
    expected = prune(reference, calibration(name), budgets(name, 0.5), progress=False, batch_size=4,
                     backend=_backend(name))
    model = build(name)
    report = prune(model, calibration(name), budgets(name, 0.5), device=compute, offload=True, progress=False,
                   batch_size=4, backend=_backend(name))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert report.settings["device"].startswith(compute)
    assert [r.kept for r in report.layers] == [r.kept for r in expected.layers]
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value.cpu(), rtol=1e-5, atol=1e-6)


def test_prune_vision_offload_returns_a_cpu_copy_equal_to_the_plain_one():
    model = build("resnet50")
    reference, expected = prune_vision(model, calibration("resnet50"), {"channels": 0.5}, batch_size=4,
                                       backend="greedy", progress=False)
    pruned, report = prune_vision(model, calibration("resnet50"), {"channels": 0.5}, batch_size=4, offload=True,
                                  backend="greedy", progress=False)
    assert report.settings["offload"] is True
    _same_records(report, expected)
    _same_weights(pruned, reference)


# ----------------------------------------------------------------- the helpers


def test_to_device_moves_every_tensor_of_a_stage_call_and_keeps_the_rest():
    cos, sin = torch.ones(2), torch.zeros(2)
    call = StageCall((torch.ones(1), None), {"position_embeddings": (cos, sin), "use_cache": False, "mask": None})
    assert to_device(call, "cpu") is call  # nothing to move: the same objects
    moved = map_tensors(call, lambda t: t.double())
    assert isinstance(moved, StageCall) and moved.args[1] is None and moved.kwargs["use_cache"] is False
    assert all(t.dtype == torch.float64 for t in _floating(moved))
    assert isinstance(moved.kwargs["position_embeddings"], tuple)
    assert call.kwargs["position_embeddings"][0].dtype == torch.float32  # the original is left alone


# ----------------------------------------------------------------- bad input, refused before any work


def _forward_counter(model):
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("offload", ["yes", 1, None])
def test_offload_must_be_a_bool(offload):
    model = build("bert")
    calls = _forward_counter(model)
    with pytest.raises(ValueError, match="offload: expected True or False"):
        prune(model, calibration("bert"), budgets("bert", 0.5), offload=offload, progress=False)
    with pytest.raises(ValueError, match="offload: expected True or False"):
        prune_vision(build("resnet50"), calibration("resnet50"), {"channels": 0.5}, offload=offload)
    with pytest.raises(ValueError, match="offload: expected True or False"):
        oneshot(model, calibration("bert"), budgets=0.5, offload=offload)
    assert not calls


@pytest.mark.parametrize("device", ["gpu0", "not-a-device", 3, "meta"])
def test_an_unknown_device_is_refused_naming_the_argument(device):
    model = build("llama")
    calls = _forward_counter(model)
    for offload in (True, False):
        with pytest.raises(ValueError, match="^device: "):
            prune(model, calibration("llama"), budgets("llama", 0.5), device=device, offload=offload,
                  progress=False)
    assert not calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_missing_gpu_is_refused_before_any_work():
    model = build("llama")
    calls = _forward_counter(model)
    with pytest.raises(ValueError, match="device: 'cuda'.*no CUDA GPU"):
        prune(model, calibration("llama"), budgets("llama", 0.5), device="cuda", offload=True, progress=False)
    with pytest.raises(ValueError, match="device: 'cuda'.*no CUDA GPU"):
        oneshot(model, calibration("llama"), budgets=0.5, device="cuda", offload=True)
    assert not calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_a_compute_device_other_than_the_model_s_needs_offload():
    model = build("llama")
    with pytest.raises(ValueError, match="device: the model is on cpu and offload is off"):
        prune(model, calibration("llama"), budgets("llama", 0.5), device="cuda", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_a_speedup_target_is_refused_with_offload_to_another_device():
    model = build("llama")
    with pytest.raises(ValueError, match="offload: a speedup target"):
        prune(model, calibration("llama"), CostTarget("speedup", 1.2), device="cuda", offload=True, progress=False)


# ----------------------------------------------------------------- the command line and oneshot


def test_cli_prune_offload_records_it_and_prunes_the_same_layers(tiny_bert_folder, tmp_path):  # noqa: F811
    reports = {}
    for flag in ([], ["--offload"]):
        path = tmp_path / f"report{len(flag)}.json"
        argv = ["prune", "--model", str(tiny_bert_folder), "--heads-sparsity", "0.5", "--neurons-sparsity", "0.5",
                "--samples", "8", "--seq-len", "16", "--batch-size", "4", "--backend", "greedy", "--quiet",
                "--no-eval", "--device", "cpu", "--report", str(path), *flag]
        assert cli.main(argv) == 0
        reports[bool(flag)] = json.loads(path.read_text())
    assert reports[True]["settings"]["offload"] is True and reports[False]["settings"]["offload"] is False
    assert [(r["kept"], r["loss"]) for r in reports[True]["layers"]] == [
        (r["kept"], r["loss"]) for r in reports[False]["layers"]]


def test_oneshot_passes_offload_to_prune():
    model = build("llama")
    reference, expected = _pruned("llama", offload=False)
    pruned, report = oneshot(model, calibration("llama"), budgets=budgets("llama", 0.5), offload=True,
                             batch_size=4, progress=False)
    assert pruned is model and report.settings["offload"] is True
    _same_records(report, expected)
    _same_weights(model, reference)
