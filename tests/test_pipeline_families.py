"""One ``prune(model, calibration, budgets, backend=...)`` call for transformers and torchvision."""

from __future__ import annotations

import pytest
import torch

import osscar_opt
from osscar_opt.budget import Budget, keep_count
from tests.tiny_models import build, calibration, images, output
from tests.tiny_transformers import tiny_model, token_ids

CASES = {  # the three: BERT heads, LLaMA GQA key-value groups, ResNet channels
    "bert": ({"heads": 0.5, "neurons": 0.5}, {"heads", "neurons"}),
    "llama": ({"kv_groups": 0.5, "neurons": 0.5}, {"kv_groups", "neurons"}),
    "resnet50": ({"channels": 0.5}, {"channels"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(CASES))
def test_one_prune_call_prunes_every_family(family):
    budgets, kinds = CASES[family]
    model, data = build(family), calibration(family)
    parameters = sum(p.numel() for p in model.parameters())
    report = osscar_opt.prune(model, data, budgets, backend="greedy", progress=False)
    assert {record.kind for record in report.layers} == kinds
    for record in report.layers:
        assert record.keep == keep_count(record.groups, 0.5) == len(record.kept)
        assert record.dense_loss <= record.loss
    assert sum(p.numel() for p in model.parameters()) < parameters
    assert torch.isfinite(output(model, data)).all()
    assert report.to_dict()["settings"]["budgets"] == budgets


class FirstLayerOnly:
    """A per-layer budget: half of the groups of the first structure, nothing else."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, int]] = []

    def keep(self, name: str, kind: str, num_groups: int) -> int | None:
        self.asked.append((name, kind, num_groups))
        return num_groups // 2 if len(self.asked) == 1 else None

    def kinds(self) -> set[str]:
        return {"heads", "neurons"}


def test_a_per_layer_budget_object_plugs_into_the_same_loop():
    budget = FirstLayerOnly()
    assert isinstance(budget, Budget)
    model = tiny_model("bert")
    report = osscar_opt.prune(model, token_ids(), budget, backend="greedy", progress=False)
    assert [(r.name, r.keep) for r in report.layers] == [("encoder.layer.0.attention.output.dense", 2)]
    assert [kind for _, kind, _ in budget.asked] == ["heads", "neurons"] * 2


@pytest.mark.parametrize(
    ("budgets", "message"),
    [
        ({"attention": 0.5}, "unknown structure kinds"),
        ({"channels": 0.5}, r"prune \['channels'\], but this bert model has only"),
        ({"heads": 1.0}, r"budgets\['heads'\]"),
        ({"heads": "0.5"}, r"budgets\['heads'\]"),
        ([0.5], "budgets: expected a mapping"),
    ],
)
def test_bad_budgets_are_refused_before_any_forward_pass(budgets, message):
    model = tiny_model("bert")

    def no_forward(*_args, **_kwargs):
        raise AssertionError("a forward pass ran before the budget was checked")

    model.forward = no_forward
    with pytest.raises(ValueError, match=message):
        osscar_opt.prune(model, token_ids(), budgets, progress=False)


def test_a_budget_for_a_kind_the_model_lacks_is_refused_for_torchvision():
    with pytest.raises(ValueError, match=r"but this resnet50 model has only \['channels'\]"):
        osscar_opt.prune(build("resnet50"), images(), {"heads": 0.5}, progress=False)


@pytest.mark.parametrize(
    ("num_groups", "sparsity", "keep"),
    [(5, 0.3, 3), (12, 0.25, 9), (1536, 0.1, 1382), (3, 0.34, 2), (1, 0.9, 1), (10, 0.0, 10)],
)
def test_keep_count_removes_the_rounded_share(num_groups, sparsity, keep):
    assert keep_count(num_groups, sparsity) == keep


class FixedKeep:
    def __init__(self, keep) -> None:
        self.value = keep

    def keep(self, name: str, kind: str, num_groups: int):
        return self.value

    def kinds(self) -> set[str]:
        return {"heads", "neurons"}


@pytest.mark.parametrize("keep", [0, 5, 2.0, True])
def test_a_budget_object_returning_a_bad_keep_is_refused_naming_the_layer(keep):
    with pytest.raises(ValueError, match=r"budgets: keep for encoder.layer.0.attention.output.dense must be"):
        osscar_opt.prune(tiny_model("bert"), token_ids(), FixedKeep(keep), progress=False)
