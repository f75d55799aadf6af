"""Hugging Face vision transformers (issue 26): ViT (with its classifier) and DeiT on tiny random
configs: heads and MLP neurons pruned to a uniform budget and to a cost target, each layer's loss the
layer problem's, stock reload (the config states head_dim) with the same outputs, bad calibration refused."""

from __future__ import annotations

import pytest
import torch
import transformers

import osscar_opt
from osscar_opt.budget import CostTarget, PerLayerKeep
from osscar_opt.pipeline import prune
from osscar_opt.problem import LayerProblem

MODELS = {"vit": ("ViTConfig", "ViTForImageClassification"), "deit": ("DeiTConfig", "DeiTModel")}


def tiny_vit(family: str) -> torch.nn.Module:
    config_name, model_name = MODELS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=48, image_size=16, patch_size=4, num_labels=3)
    return getattr(transformers, model_name)(config).eval()


def images(count: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def output(model, pixels):
    out = model(pixel_values=pixels)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def auto_class(model):
    return transformers.AutoModelForImageClassification if hasattr(model, "classifier") else transformers.AutoModel


def run(model, budgets, **options):
    return prune(model, images(), budgets, backend="greedy", damp=0.01, batch_size=4, progress=False, **options)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_heads_and_neurons_prune_exactly_and_reload_with_the_stock_class(family, tmp_path):
    model = tiny_vit(family)
    report = run(model, {"heads": 0.5, "neurons": 0.5}, save_problems=tmp_path / "problems")
    assert [(r.kind, r.groups, r.keep) for r in report.layers] == [("heads", 4, 2), ("neurons", 48, 24)] * 2
    problems = {p.meta["name"]: p for p in map(LayerProblem.load, (tmp_path / "problems").glob("*.safetensors"))}
    for record in report.layers:
        assert record.loss == pytest.approx(problems[record.name].loss(record.kept), rel=1e-9, abs=1e-12)
    assert report.settings["config_describes_pruned_model"] is True
    rebuilt = type(model)(model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(output(rebuilt, images(2, 3)), output(model, images(2, 3)), rtol=0, atol=1e-6)
    osscar_opt.save_pruned(model, tmp_path / "saved", report=report)
    stock = auto_class(model).from_pretrained(tmp_path / "saved").eval()
    assert type(stock) is type(model) and stock.config.num_attention_heads == 2
    torch.testing.assert_close(output(stock, images(2, 3)), output(model, images(2, 3)), rtol=0, atol=1e-5)


def test_a_macs_target_and_per_block_widths_reload_with_load_pruned(tmp_path):
    model = tiny_vit("vit")
    report = run(model, CostTarget("macs", 0.8, grid=8))
    assert report.settings["allocation"]["target_met"]
    osscar_opt.save_pruned(model, tmp_path / "target", report=report)
    torch.testing.assert_close(output(osscar_opt.load_pruned(tmp_path / "target"), images(2, 3)),
                               output(model, images(2, 3)), rtol=0, atol=1e-5)
    model = tiny_vit("deit")
    run(model, PerLayerKeep({"layers.0.attention.o_proj": 1, "layers.1.mlp.fc2": 10}))
    osscar_opt.save_pruned(model, tmp_path / "per-block")
    stock = transformers.AutoModel.from_pretrained(tmp_path / "per-block", trust_remote_code=True).eval()
    torch.testing.assert_close(output(stock, images(2, 3)), output(model, images(2, 3)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("calibration", [torch.randint(0, 9, (8, 10)), torch.randn(8, 1, 16, 16), [1.0]])
def test_calibration_that_is_not_images_is_refused(calibration):
    with pytest.raises(ValueError, match=r"calibration: expected a non-empty float \(images, 3, 16, 16\)"):
        prune(tiny_vit("vit"), calibration, {"heads": 0.5}, progress=False)
