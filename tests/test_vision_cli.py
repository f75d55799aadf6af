"""``osscar prune --model <torchvision architecture>`` end to end, its bad input, and the digits data."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from osscar_opt import cli, load_pruned
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.data.digits import digits


def prune_argv(*extra: str) -> list[str]:
    """``osscar prune`` on MobileNetV2 at 50% channels, small enough for a test, plus ``extra``."""
    return ["prune", "--model", "mobilenet_v2", "--channels-sparsity", "0.5", "--backend", "greedy",
            "--samples", "8", "--batch-size", "4", "--image-size", "32", "--quiet", *extra]


def test_prune_with_weights_and_images_writes_model_report_and_problems(tmp_path, capsys):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    save_file({"images": torch.randn(8, 3, 32, 32)}, str(tmp_path / "images.safetensors"))
    argv = prune_argv(
        "--weights", str(tmp_path / "weights.pt"), "--calibration-images", str(tmp_path / "images.safetensors"),
        "--output", str(tmp_path / "pruned"), "--report", str(tmp_path / "report.json"),
        "--save-problems", str(tmp_path / "problems"), "--backend", "local-search",
        "--backend-option", "swap_size=2", "--backend-option", "restarts=0",
    )
    assert cli.main(argv) == 0
    assert "internal channels" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["channels_after"] < report["channels_before"] == sum(adapter_for(model).internal_channels().values())
    assert report["parameters_pruned"] < report["parameters_dense"]
    assert 0.0 <= report["digits_accuracy_pruned"] <= 1.0 and 0.0 <= report["digits_accuracy_dense"] <= 1.0
    settings = report["settings"]
    assert settings["architecture"] == "mobilenet_v2" and settings["budgets"] == {"channels": 0.5}
    assert settings["backend"] == "local-search" and settings["backend_options"] == {"swap_size": "2", "restarts": "0"}
    assert settings["samples"] == 8 and settings["sample_shape"] == [3, 32, 32] and report["seconds"] > 0
    assert all(layer["kind"] == "channels" and len(layer["kept"]) == layer["keep"] for layer in report["layers"])
    reloaded = load_pruned(tmp_path / "pruned")
    assert sum(adapter_for(reloaded).internal_channels().values()) == report["channels_after"]
    assert len(list((tmp_path / "problems").glob("*.safetensors"))) == len(report["layers"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (prune_argv("--channels-sparsity", "1.2"), "channels_sparsity: expected a fraction in [0, 1)"),
        (["prune", "--model", "mobilenet_v2", "--quiet"], "channels_sparsity: required for torchvision models"),
        (prune_argv("--samples", "0"), "samples: expected a positive integer"),
        (prune_argv("--backend", "no-such-backend"), "backend: unknown backend 'no-such-backend'"),
        (prune_argv("--weights", "/no/such/weights.pt"), "weights: no such file"),
        # not a torchvision architecture osscar knows: taken for a transformers model
        (["prune", "--model", "vgg11", "--channels-sparsity", "0.5", "--quiet"],
         "torchvision models only (resnet18, resnet34, resnet50, resnet101, mobilenet_v2, convnext_tiny, "
         "convnext_small, convnext_base, convnext_large, vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14, "
         "vision_transformer), got 'vgg11'"),
        (["prune", "--model", "vgg11", "--quiet"], "or a torchvision architecture: resnet18, resnet34, resnet50"),
    ],
)
def test_bad_prune_arguments_are_clean_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_unreadable_or_foreign_weights_are_clean_errors(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert cli.main(prune_argv("--weights", str(tmp_path / "bad.pt"))) == 2
    assert "weights: cannot read" in capsys.readouterr().err
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet18.pt")
    assert cli.main(prune_argv("--weights", str(tmp_path / "resnet18.pt"))) == 2
    assert "weights: do not fit the MobileNetV2 architecture" in capsys.readouterr().err


def test_digits_split_is_fixed():
    train, test = digits(image_size=16)
    again, _ = digits(image_size=16)
    assert train.images.shape[1:] == (3, 16, 16) and len(train.labels) + len(test.labels) == 1797
    assert torch.equal(train.labels, again.labels)
    assert set(test.labels.tolist()) == set(range(10))
