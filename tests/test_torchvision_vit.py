"""torchvision VisionTransformer (issue 26): the MLP hidden units of every encoder block (heads are not
a structure: nn.MultiheadAttention ties its inner width to its input width), recognized by layout,
pruned exactly to a uniform budget and to a target, reloaded from shape and constructor records."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

import osscar_opt
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.budget import CostTarget
from osscar_opt.pipeline import prune
from osscar_opt.problem import LayerProblem


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=3).eval()


def images(count: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_named_and_custom_sizes_are_recognized():
    with torch.device("meta"):
        assert adapter_for(torchvision.models.vit_b_16()).architecture == "vit_b_16"
        assert adapter_for(torchvision.models.vit_l_32()).architecture == "vit_l_32"
    adapter = adapter_for(tiny_vit())
    assert adapter.architecture == "vision_transformer"
    assert [(s.name, s.kind, s.num_groups) for s in adapter.structures()] == [
        ("encoder.layers.encoder_layer_0.mlp.3", "channels", 32),
        ("encoder.layers.encoder_layer_1.mlp.3", "channels", 32)]


def test_the_blocks_run_from_the_stage_inputs_reproduce_the_model():
    model = tiny_vit()
    adapter = adapter_for(model)
    hidden, calls = adapter.stage_inputs([images(2)])
    with torch.no_grad():
        state = hidden[0]
        for stage in adapter.stages():
            state = adapter.run_stage(stage, state, calls[0])
        logits = model.heads(model.encoder.ln(state)[:, 0])
        torch.testing.assert_close(logits, model(images(2)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("budgets", [{"channels": 0.5}, CostTarget("params", 0.9, grid=8)], ids=["uniform", "target"])
def test_mlp_units_prune_exactly_and_reload_from_the_records(budgets, tmp_path):
    model = tiny_vit()
    report = prune(model, images(), budgets, backend="greedy", damp=0.01, batch_size=4, progress=False,
                   save_problems=tmp_path / "problems")
    if isinstance(budgets, CostTarget):
        assert report.settings["allocation"]["target_met"]
    else:
        assert [(r.groups, r.keep) for r in report.layers] == [(32, 16)] * 2
    problems = {p.meta["name"]: p for p in map(LayerProblem.load, (tmp_path / "problems").glob("*.safetensors"))}
    for record in report.layers:
        assert record.loss == pytest.approx(problems[record.name].loss(record.kept), rel=1e-9, abs=1e-12)
    osscar_opt.save_pruned(model, tmp_path / "saved", report=report)
    meta = json.loads((tmp_path / "saved" / "osscar_pruned.json").read_text())
    assert meta["constructor"]["class"] == "VisionTransformer" and meta["architecture"] == "vision_transformer"
    with torch.no_grad():
        torch.testing.assert_close(osscar_opt.load_pruned(tmp_path / "saved")(images(2, 3)), model(images(2, 3)),
                                   rtol=0, atol=1e-5)


def test_heads_are_refused_naming_the_kinds_it_has():
    with pytest.raises(ValueError, match=r"but this vision_transformer model has only \['channels'\]"):
        prune(tiny_vit(), images(), {"heads": 0.5}, progress=False)
