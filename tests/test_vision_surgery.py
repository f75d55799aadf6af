"""ResNet / MobileNetV2 channel surgery: exactness, forward after pruning, save and reload, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from osscar_opt import load_pruned, save_pruned
from osscar_opt.adapters import torchvision_io
from osscar_opt.io import META_FILE
from osscar_opt.vision import SUPPORTED, channels_to_keep, identify, internal_channels, prune_vision


def small_model(architecture: str, seed: int = 0) -> nn.Module:
    """Stock torchvision models made cheap: narrow bottlenecks / width, BN statistics randomized."""
    torch.manual_seed(seed)
    if architecture == "mobilenet_v2":
        model = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=5)
    elif architecture == "resnet50":
        model = torchvision.models.resnet50(width_per_group=8, num_classes=5)
    else:
        model = torchvision.models.get_model(architecture, weights=None, num_classes=5)
    for module in model.modules():  # non-trivial BN so that eval mode is not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("architecture", ["mobilenet_v2", "resnet50"])
def test_keep_all_reproduces_outputs(architecture, images):
    model = small_model(architecture)
    pruned, report = prune_vision(model, images, 0.0, backend="magnitude", batch_size=4)
    assert report["channels_after"] == report["channels_before"]
    assert relative_error(outputs(pruned, images), outputs(model, images)) < 1e-5
    assert not model.training and pruned is not model


def zero_half_of_every_unit(model: nn.Module) -> dict[str, list[int]]:
    """Zero the consumer columns of every odd internal channel; returns the surviving channels."""
    survivors = {}
    for name, channels in internal_channels(model).items():
        consumer = model.get_submodule(name)
        consumer.weight.data[:, 1::2] = 0.0
        survivors[name] = list(range(0, channels, 2))
    return survivors


@pytest.mark.parametrize("architecture", ["mobilenet_v2", "resnet50"])
def test_pruning_zeroed_channels_changes_nothing(architecture, images):
    model = small_model(architecture, seed=2)
    survivors = zero_half_of_every_unit(model)
    pruned, report = prune_vision(model, images, 0.5, backend="magnitude", batch_size=4)
    for entry in report["layers"]:
        assert entry["kept_channels"] == survivors[entry["layer"]]
    assert report["channels_after"] == sum(len(kept) for kept in survivors.values())
    assert relative_error(outputs(pruned, images), outputs(model, images)) < 1e-5


def test_resnet18_forward_after_pruning_and_reload(images, tmp_path):
    model = small_model("resnet18")
    pruned, report = prune_vision(model, images[:4], 0.5, backend="activation")
    assert [entry["kept"] for entry in report["layers"]] == [
        channels_to_keep(entry["channels"], 0.5) for entry in report["layers"]
    ]
    assert pruned.layer1[0].conv1.out_channels == 32 and pruned.layer4[1].conv2.in_channels == 256
    result = outputs(pruned, images)
    assert result.shape == (6, 5) and torch.isfinite(result).all()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    save_pruned(pruned, tmp_path / "resnet18")
    reloaded = load_pruned(tmp_path / "resnet18")
    assert torch.equal(outputs(reloaded, images), result)
    assert internal_channels(reloaded) == internal_channels(pruned)


def test_mobilenet_forward_local_search_save_reload(images, tmp_path):
    model = small_model("mobilenet_v2", seed=3)
    pruned, report = prune_vision(model, images, 0.3, backend="local-search", batch_size=3)
    block = pruned.features[2].conv
    assert block[0][0].out_channels == block[1][0].groups == block[1][1].num_features == block[2].in_channels
    assert block[1][0].groups == channels_to_keep(model.features[2].conv[2].in_channels, 0.3)
    assert all(entry["loss"] >= entry["loss_all_kept"] * (1 - 1e-9) for entry in report["layers"])
    result = outputs(pruned, images)
    assert torch.isfinite(result).all()
    meta, state = torchvision_io.export(pruned)
    assert meta["architecture"] == "mobilenet_v2" and meta["internal_channels"] == internal_channels(pruned)
    save_pruned(pruned, tmp_path / "mobilenet")
    assert torch.equal(outputs(load_pruned(tmp_path / "mobilenet"), images), result)
    fresh = torchvision_io.load_weights(torchvision.models.mobilenet_v2(num_classes=5), state).eval()
    assert torch.equal(outputs(fresh, images), result)


def test_detects_architectures_from_structure():
    assert identify(torchvision.models.resnet34())[0] == "resnet34"
    assert identify(small_model("resnet50"))[0] == "resnet50"
    assert set(SUPPORTED) == {"resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2"}
    assert torchvision_io.handles(small_model("mobilenet_v2"))
    assert not torchvision_io.handles(nn.Linear(2, 2))


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "0.3", True, float("nan")])
def test_bad_sparsity(sparsity, images):
    with pytest.raises(ValueError, match="channels_sparsity"):
        prune_vision(small_model("mobilenet_v2"), images, sparsity)


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.Conv2d(3, 4, 3)), ResNet(BasicBlock, [1, 1, 1, 1]), torchvision.models.squeezenet1_1()],
    ids=["sequential", "resnet-1111", "squeezenet"],
)
def test_unknown_model(model, images):
    with pytest.raises(ValueError, match="supported: resnet18, resnet34, resnet50, resnet101, mobilenet_v2"):
        prune_vision(model, images, 0.3)


def test_bad_calibration_and_options(images):
    model = small_model("mobilenet_v2")
    with pytest.raises(ValueError, match="calibration_images"):
        prune_vision(model, images[0], 0.3)
    with pytest.raises(ValueError, match="calibration_images"):
        prune_vision(model, [], 0.3)
    with pytest.raises(ValueError, match="batch_size"):
        prune_vision(model, images, 0.3, batch_size=0)
    with pytest.raises(ValueError, match="backend_options"):
        prune_vision(model, images, 0.3, backend_options=["swap=1"])


def test_reload_rejects_foreign_records(tmp_path):
    folder = save_pruned(small_model("mobilenet_v2"), tmp_path / "saved")
    document = json.loads((folder / META_FILE).read_text())
    for change, message in (({"architecture": "vgg11"}, "architecture"), ({"modules": {}}, "meta")):
        (folder / META_FILE).write_text(json.dumps({**document, **change}))
        with pytest.raises(ValueError, match=message):
            load_pruned(folder)
    (folder / torchvision_io.WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match="directory"):
        torchvision_io.rebuild(document, folder)


def test_refit_bias_adds_a_consumer_bias_that_survives_reload(images, tmp_path):
    model = small_model("mobilenet_v2", seed=4)
    pruned, _ = prune_vision(model, images, 0.0, backend="magnitude", refit_bias=True)
    consumer = pruned.features[2].conv[2]
    assert consumer.bias is not None and consumer.bias.abs().max() < 1e-4
    assert relative_error(outputs(pruned, images), outputs(model, images)) < 1e-5
    pruned_half, _ = prune_vision(model, images, 0.5, backend="greedy", refit_bias=True)
    save_pruned(pruned_half, tmp_path / "refit")
    assert torch.equal(outputs(load_pruned(tmp_path / "refit"), images), outputs(pruned_half, images))
