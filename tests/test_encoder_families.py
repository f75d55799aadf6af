"""Encoder families (issue 26) on tiny random configs: RoBERTa and XLM-R (the BERT layout),
DistilBERT, MPNet (MLP neurons only: its per-head position bias is shared by all blocks) and
ModernBERT (fused Wqkv, GLU MLP, local and global layers): pruned to a uniform budget and to a
cost target, each layer's loss the layer problem's, saved folders reloading with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import osscar_opt
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.budget import CostTarget
from osscar_opt.pipeline import prune
from osscar_opt.problem import LayerProblem
from tests.tiny_families import ENCODERS, tiny_encoder
from tests.tiny_transformers import output_of, token_ids

KINDS = {"roberta": {"heads", "neurons"}, "xlm-roberta": {"heads", "neurons"}, "distilbert": {"heads", "neurons"},
         "mpnet": {"neurons"}, "modernbert": {"heads", "neurons"}}


def run(model, budgets, **options):
    return prune(model, token_ids(8), budgets, backend="greedy", damp=0.01, batch_size=4, progress=False, **options)


def reload_and_compare(model, report, folder) -> str:
    osscar_opt.save_pruned(model, folder, report=report)
    ids = token_ids(3, seed=5)
    expected = output_of(model, ids)
    torch.testing.assert_close(output_of(osscar_opt.load_pruned(folder), ids), expected, rtol=0, atol=1e-5)
    if report.settings["config_describes_pruned_model"]:
        stock, how = transformers.AutoModel.from_pretrained(folder).eval(), "stock"
    else:
        assert "auto_map" in json.loads((folder / "config.json").read_text())
        stock, how = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval(), "trust_remote_code"
    assert isinstance(stock, type(model))
    torch.testing.assert_close(output_of(stock, ids), expected, rtol=0, atol=1e-5)
    return how


def test_every_encoder_is_listed_with_its_kinds():
    assert set(KINDS) == set(ENCODERS)
    for family, kinds in KINDS.items():
        assert {s.kind for s in adapter_for(tiny_encoder(family)).structures()} == kinds, family


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_blocks_run_one_by_one_reproduce_the_encoder(family):
    model = tiny_encoder(family)
    adapter = adapter_for(model)
    ids = token_ids(2, seed=3)
    hidden, calls = adapter.stage_inputs([ids])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
        state = hidden[0]
        for index, stage in enumerate(adapter.stages()):
            torch.testing.assert_close(state, expected[index], rtol=0, atol=1e-6)
            state = adapter.run_stage(stage, state, calls[0])


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_a_uniform_budget_prunes_every_kind_exactly_and_reloads(family, tmp_path):
    model = tiny_encoder(family)
    report = run(model, dict.fromkeys(KINDS[family], 0.5), save_problems=tmp_path / "problems")
    assert {record.kind for record in report.layers} == KINDS[family]
    problems = {p.meta["name"]: p for p in map(LayerProblem.load, (tmp_path / "problems").glob("*.safetensors"))}
    for record in report.layers:
        assert record.loss == pytest.approx(problems[record.name].loss(record.kept), rel=1e-9, abs=1e-12)
    if report.settings["config_describes_pruned_model"]:  # the pruned model is the one its config rebuilds
        rebuilt = type(model)(model.config).eval()
        rebuilt.load_state_dict(model.state_dict())
        torch.testing.assert_close(output_of(rebuilt, token_ids(3)), output_of(model, token_ids(3)), rtol=0, atol=1e-6)
    expected = "stock" if KINDS[family] == {"neurons"} else "trust_remote_code"  # head size = hidden / heads
    assert reload_and_compare(model, report, tmp_path / "saved") == expected


@pytest.mark.parametrize("family", ["distilbert", "modernbert", "roberta"])
def test_uniform_mlp_widths_reload_with_the_stock_class(family, tmp_path):
    model = tiny_encoder(family)
    report = run(model, {"neurons": 0.25})
    assert reload_and_compare(model, report, tmp_path / "saved") == "stock"


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_a_params_target_is_met_and_the_folder_reloads(family, tmp_path):
    model = tiny_encoder(family)
    report = run(model, CostTarget("params", 0.95, grid=8))
    assert report.settings["allocation"]["target_met"]
    reload_and_compare(model, report, tmp_path / "saved")


def test_mpnet_heads_are_refused_naming_the_kinds_it_has():
    with pytest.raises(ValueError, match=r"prune \['heads'\], but this mpnet model has only \['neurons'\]"):
        run(tiny_encoder("mpnet"), {"heads": 0.5, "neurons": 0.5})
