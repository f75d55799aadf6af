"""ResNet / MobileNetV2 channel pruning: ``prune_vision`` on a copy, forward after pruning, save and
reload, architecture detection, bias re-fit and bad input. (What holds for every family, keep-all,
zeroed channels, the save/reload round trip, lives in test_surgery_tiny_models and test_io_save_reload.)"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from osscar_opt import load_pruned, save_pruned
from osscar_opt.adapters.registry import adapter_for, vision_architectures
from osscar_opt.budget import keep_count
from osscar_opt.io import META_FILE, WEIGHTS_FILE, read_state_dict
from osscar_opt.io import torchvision as torchvision_io
from osscar_opt.pipeline import prune_vision
from tests.tiny_models import KeepEverything, relative_error
from tests.tiny_models import images as random_images
from tests.tiny_models import small_vision_model as small_model


def outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def channels(model: nn.Module) -> int:
    return sum(adapter_for(model).internal_channels().values())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return random_images()


def test_prune_vision_prunes_a_copy_and_leaves_the_original_alone(images):
    model = small_model("mobilenet_v2", seed=1)
    dense = outputs(model, images)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    pruned, report = prune_vision(model, images, {"channels": 0.5}, backend="magnitude", batch_size=4)
    assert pruned is not model and not pruned.training and not model.training
    assert channels(pruned) < channels(model) == sum(record.groups for record in report.layers)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert torch.equal(outputs(model, images), dense)
    assert report.settings["architecture"] == "mobilenet_v2" and report.settings["family"] == "mobilenet"
    assert report.settings["budgets"] == {"channels": 0.5} and report.settings["sample_shape"] == [3, 32, 32]


@pytest.mark.slow
def test_resnet18_forward_after_pruning_and_reload(images, tmp_path):
    model = small_model("resnet18")
    pruned, report = prune_vision(model, images[:4], {"channels": 0.5}, backend="activation")
    assert [record.keep for record in report.layers] == [
        keep_count(record.groups, 0.5) for record in report.layers
    ]
    assert all(len(record.kept) == record.keep and record.kind == "channels" for record in report.layers)
    assert pruned.layer1[0].conv1.out_channels == 32 and pruned.layer4[1].conv2.in_channels == 256
    result = outputs(pruned, images)
    assert result.shape == (6, 5) and torch.isfinite(result).all()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    save_pruned(pruned, tmp_path / "resnet18")
    reloaded = load_pruned(tmp_path / "resnet18")
    assert torch.equal(outputs(reloaded, images), result)
    assert adapter_for(reloaded).internal_channels() == adapter_for(pruned).internal_channels()


@pytest.mark.slow
def test_mobilenet_forward_local_search_save_reload(images, tmp_path):
    model = small_model("mobilenet_v2", seed=3)
    pruned, report = prune_vision(model, images, {"channels": 0.3}, backend="local-search", batch_size=3)
    block = pruned.features[2].conv
    assert block[0][0].out_channels == block[1][0].groups == block[1][1].num_features == block[2].in_channels
    assert block[1][0].groups == keep_count(model.features[2].conv[2].in_channels, 0.3)
    assert all(record.loss >= record.dense_loss * (1 - 1e-9) for record in report.layers)
    result = outputs(pruned, images)
    assert torch.isfinite(result).all()
    meta, state = torchvision_io.export(pruned)
    assert meta["architecture"] == "mobilenet_v2"
    assert meta["internal_channels"] == adapter_for(pruned).internal_channels()
    save_pruned(pruned, tmp_path / "mobilenet")
    assert torch.equal(outputs(load_pruned(tmp_path / "mobilenet"), images), result)
    fresh = torchvision_io.load_weights(torchvision.models.mobilenet_v2(num_classes=5), state).eval()
    assert torch.equal(outputs(fresh, images), result)


def test_detects_architectures_from_structure():
    assert adapter_for(torchvision.models.resnet34()).architecture == "resnet34"
    assert adapter_for(small_model("resnet50")).architecture == "resnet50"
    assert set(vision_architectures()) == {"resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2",
                                           "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
                                           "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14",
                                           "vision_transformer"}
    assert torchvision_io.handles(small_model("mobilenet_v2"))
    assert not torchvision_io.handles(nn.Linear(2, 2))


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "0.3", True, float("nan")])
def test_bad_sparsity(sparsity, images):
    with pytest.raises(ValueError, match=r"budgets\['channels'\]"):
        prune_vision(small_model("mobilenet_v2"), images, {"channels": sparsity})


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.Conv2d(3, 4, 3)), ResNet(BasicBlock, [1, 1, 1, 1]), torchvision.models.squeezenet1_1()],
    ids=["sequential", "resnet-1111", "squeezenet"],
)
def test_unknown_model(model, images):
    with pytest.raises(ValueError, match="supported: .*resnet18, resnet34, resnet50, resnet101, mobilenet_v2"):
        prune_vision(model, images, {"channels": 0.3})


def test_bad_calibration_and_options(images):
    model = small_model("mobilenet_v2")
    with pytest.raises(ValueError, match="calibration"):
        prune_vision(model, images[0], {"channels": 0.3})
    with pytest.raises(ValueError, match="calibration"):
        prune_vision(model, [], {"channels": 0.3})
    with pytest.raises(ValueError, match="calibration"):
        prune_vision(model, images.long(), {"channels": 0.3})
    with pytest.raises(ValueError, match="batch_size"):
        prune_vision(model, images, {"channels": 0.3}, batch_size=0)
    with pytest.raises(ValueError, match="backend_options"):
        prune_vision(model, images, {"channels": 0.3}, backend_options=["swap=1"])


def test_reload_rejects_foreign_records(tmp_path):
    folder = save_pruned(small_model("mobilenet_v2"), tmp_path / "saved")
    document = json.loads((folder / META_FILE).read_text())
    for change, message in (({"architecture": "vgg11"}, "architecture"), ({"modules": {}}, "meta")):
        (folder / META_FILE).write_text(json.dumps({**document, **change}))
        with pytest.raises(ValueError, match=message):
            load_pruned(folder)
    state = read_state_dict(folder, document)
    del state["features.2.conv.2.weight"]
    with pytest.raises(ValueError, match="directory"):  # weights that do not fit the recorded modules
        torchvision_io.rebuild(document, state, folder)
    (folder / META_FILE).write_text(json.dumps(document))
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match="directory"):
        load_pruned(folder)


@pytest.mark.slow
def test_refit_bias_adds_a_consumer_bias_that_survives_reload(images, tmp_path):
    model = small_model("mobilenet_v2", seed=4)
    assert model.features[2].conv[2].bias is None
    pruned, _ = prune_vision(model, images, KeepEverything(), backend="magnitude", refit_bias=True)
    consumer = pruned.features[2].conv[2]
    assert consumer.bias is not None and consumer.bias.abs().max() < 1e-4
    assert relative_error(outputs(pruned, images), outputs(model, images)) < 1e-5
    pruned_half, _ = prune_vision(model, images, {"channels": 0.5}, backend="greedy", refit_bias=True)
    assert pruned_half.features[2].conv[2].bias is not None
    save_pruned(pruned_half, tmp_path / "refit")
    assert torch.equal(outputs(load_pruned(tmp_path / "refit"), images), outputs(pruned_half, images))


@pytest.mark.parametrize("width", [0.25, 1.0])  # at 1.0 the first block (expand ratio 1) has 32 -> 16 channels
def test_pruned_mobilenet_reloads_with_the_stock_class_from_its_recorded_arguments(images, tmp_path, width):
    from safetensors.torch import load_file

    dense = small_model("mobilenet_v2") if width == 0.25 else \
        torchvision.models.mobilenet_v2(width_mult=width, num_classes=5).eval()
    pruned, _ = prune_vision(dense, images, {"channels": 0.3}, backend="magnitude", progress=False)
    save_pruned(pruned, tmp_path / "mobilenet")
    stock = json.loads((tmp_path / "mobilenet" / META_FILE).read_text())["stock"]
    assert stock["class"] == "torchvision.models.MobileNetV2"
    # the one-liner a user without osscar_opt runs: the stock class, its arguments, the weights
    model = torchvision.models.MobileNetV2(**stock["kwargs"])
    model.load_state_dict(load_file(str(tmp_path / "mobilenet" / WEIGHTS_FILE)), strict=True)
    assert torch.equal(outputs(model.eval(), images), outputs(pruned, images))
