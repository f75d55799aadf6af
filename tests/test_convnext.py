"""torchvision ConvNeXt (issue 26): the hidden units of every block's MLP, recognized by layout,
pruned exactly (each layer's loss the layer problem's), reloaded from shape records with the same
outputs; the residual stream, layer scales and LayerNorms are never cut."""

from __future__ import annotations

import pytest
import torch
import torchvision

import osscar_opt
from osscar_opt.adapters.registry import adapter_for, vision_architectures
from osscar_opt.budget import CostTarget, PerLayerKeep
from osscar_opt.pipeline import prune
from osscar_opt.problem import LayerProblem

FIRST, LAST = "features.1.0.block.5", "features.3.1.block.5"


@pytest.fixture(scope="module")
def convnext():
    torch.manual_seed(0)
    return torchvision.models.convnext_tiny(num_classes=10).eval()


def images(count: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_convnext_is_recognized_with_one_structure_per_block(convnext):
    adapter = adapter_for(convnext)
    assert adapter.architecture == "convnext_tiny" and "convnext_base" in vision_architectures()
    structures = adapter.structures()
    assert len(structures) == 18 and {s.kind for s in structures} == {"channels"}
    assert [s.num_groups for s in structures[:1] + structures[-1:]] == [384, 3072]
    assert adapter_for(torchvision.models.convnext_small(num_classes=3)).architecture == "convnext_small"


def test_two_blocks_pruned_exactly_and_reloaded_from_shape_records(convnext, tmp_path):
    import copy

    model = copy.deepcopy(convnext)
    x = images()
    report = prune(model, x, PerLayerKeep({FIRST: 100, LAST: 500}), backend="greedy", damp=0.01, batch_size=4,
                   progress=False, save_problems=tmp_path / "problems")
    assert [(r.name, r.keep) for r in report.layers] == [(FIRST, 100), (LAST, 500)]
    problems = {p.meta["name"]: p for p in map(LayerProblem.load, (tmp_path / "problems").glob("*.safetensors"))}
    for record in report.layers:
        assert record.loss == pytest.approx(problems[record.name].loss(record.kept), rel=1e-9, abs=1e-12)
    block = model.features[1][0]
    assert (block.block[3].out_features, block.block[5].in_features, block.layer_scale.shape[0]) == (100, 100, 96)
    osscar_opt.save_pruned(model, tmp_path / "saved", report=report)
    reloaded = osscar_opt.load_pruned(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images(2, 3)), model(images(2, 3)), rtol=0, atol=1e-5)


def test_a_kind_convnext_lacks_is_refused(convnext):
    with pytest.raises(ValueError, match=r"but this convnext_tiny model has only \['channels'\]"):
        prune(convnext, images(), {"heads": 0.5}, progress=False)


@pytest.mark.slow
def test_a_uniform_budget_and_a_params_target_prune_every_block(convnext, tmp_path):
    import copy

    for budgets in ({"channels": 0.5}, CostTarget("params", 0.8, grid=8)):
        model = copy.deepcopy(convnext)
        report = prune(model, images(), budgets, backend="magnitude", damp=0.01, batch_size=4, progress=False)
        if isinstance(budgets, CostTarget):
            assert report.settings["allocation"]["target_met"]
        else:
            assert len(report.layers) == 18 and all(r.keep == r.groups // 2 for r in report.layers)
        osscar_opt.save_pruned(model, tmp_path / "saved", report=report)
        with torch.no_grad():
            torch.testing.assert_close(osscar_opt.load_pruned(tmp_path / "saved")(images(2, 3)), model(images(2, 3)),
                                       rtol=0, atol=1e-5)
