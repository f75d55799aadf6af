"""``osscar prune --model <torchvision>`` entry point (``osscar_opt.vision.run_prune``) and the digits data."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from osscar_opt import load_pruned
from osscar_opt.vision import internal_channels, run_prune
from osscar_opt.vision_data import digits


def namespace(**values) -> argparse.Namespace:
    defaults = {
        "model": "mobilenet_v2", "channels_sparsity": 0.5, "backend": "greedy", "backend_option": [],
        "samples": 8, "batch_size": 4, "output": None, "report": None, "device": None, "save_problems": None,
        "weights": None, "image_size": 32,
    }
    return argparse.Namespace(**{**defaults, **values})


def test_run_prune_with_weights_and_images(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    save_file({"images": torch.randn(8, 3, 32, 32)}, str(tmp_path / "images.safetensors"))
    args = namespace(
        weights=str(tmp_path / "weights.pt"), calibration_images=str(tmp_path / "images.safetensors"),
        output=str(tmp_path / "pruned"), report=str(tmp_path / "report.json"),
        save_problems=str(tmp_path / "problems"), backend_option=["swap_size=2"], backend="local-search",
    )
    assert run_prune(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["channels_after"] < report["channels_before"]
    assert 0.0 <= report["digits_accuracy_pruned"] <= 1.0
    reloaded = load_pruned(tmp_path / "pruned")
    assert sum(internal_channels(reloaded).values()) == report["channels_after"]
    assert len(list((tmp_path / "problems").glob("*.safetensors"))) == len(report["layers"])


def test_run_prune_bad_input(tmp_path):
    with pytest.raises(ValueError, match="model"):
        run_prune(namespace(model="vgg11"))
    with pytest.raises(ValueError, match="channels_sparsity"):
        run_prune(namespace(channels_sparsity=1.2))
    with pytest.raises(ValueError, match="channels_sparsity"):
        run_prune(namespace(channels_sparsity=None))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights"):
        run_prune(namespace(weights=str(tmp_path / "bad.pt")))


def test_digits_split_is_fixed():
    train, test = digits(image_size=16)
    again, _ = digits(image_size=16)
    assert train.images.shape[1:] == (3, 16, 16) and len(train.labels) + len(test.labels) == 1797
    assert torch.equal(train.labels, again.labels)
    assert set(test.labels.tolist()) == set(range(10))
