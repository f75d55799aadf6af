"""The 2026 decoder families (issue 26) on tiny random configs: recognized by their layout, pruned to
a uniform budget and to a cost target, each layer's loss the layer problem's, the pruned model the
one its state dict rebuilds, and saved folders reloading with the same outputs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers

import osscar_opt
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.budget import CostTarget
from osscar_opt.pipeline import prune
from osscar_opt.problem import LayerProblem
from tests.tiny_families import DECODERS, tiny_decoder
from tests.tiny_transformers import output_of, token_ids

KINDS = {  # what each family offers (OLMo 2: q_norm over all heads, so attention is not a structure)
    "qwen3": {"kv_groups", "q_heads", "neurons"}, "gemma2": {"kv_groups", "q_heads", "neurons"},
    "gemma3_text": {"kv_groups", "q_heads", "neurons"}, "smollm3": {"kv_groups", "q_heads", "neurons"},
    "granite": {"kv_groups", "q_heads", "neurons"}, "olmo2": {"neurons"},
    "phi3": {"kv_groups", "q_heads", "neurons"}, "helium": {"kv_groups", "q_heads", "neurons"},
    "gpt_neox": {"heads", "neurons"},
}
STOCK_HEADS = set(KINDS) - {"gpt_neox", "helium"}
"""Families whose config states pruned head counts. GPT-NeoX's head size is hidden_size / heads;
Helium builds o_proj as hidden_size x hidden_size whatever the head count (found by the meta-device
build that checks every stock config before it is written)."""


def build(family: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # helium: "not a listed family", tested on its own
        return tiny_decoder(family)


def quiet_prune(model, budgets, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune(model, token_ids(8), budgets, backend="greedy", damp=0.01, batch_size=4, progress=False,
                     **options)


def adapter(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return adapter_for(model)


def test_every_family_is_listed_with_its_kinds():
    assert set(KINDS) == set(DECODERS)
    for family, kinds in KINDS.items():
        assert {structure.kind for structure in adapter(build(family)).structures()} == kinds, family


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_blocks_run_one_by_one_reproduce_the_model(family):
    # the call arguments captured at the first block of each layer type (sliding / global masks,
    # Gemma 3's local and global rotary bases) give every block its own
    model = build(family)
    blocks = adapter(model)
    ids = token_ids(2, seed=3)
    hidden, calls = blocks.stage_inputs([ids])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                         use_cache=False).hidden_states
        state = hidden[0]
        for index, stage in enumerate(blocks.stages()):
            torch.testing.assert_close(state, expected[index], rtol=0, atol=1e-6)
            state = blocks.run_stage(stage, state, calls[0])


def test_sliding_window_layers_get_their_own_mask():
    model = build("gemma2")
    adapter = adapter_for(model)
    ids = token_ids(2, seed=3)
    _, calls = adapter.stage_inputs([ids])
    first, second = adapter.stages()
    with torch.no_grad():
        h = torch.randn(2, ids.shape[1], 32)
        wrong = first.module(h, **{k: v for k, v in calls[0].kwargs.items() if k != "osscar_layer_calls"})[0]
        right = adapter.run_stage(second, h, calls[0], first.module)  # the global layer's arguments
    assert not torch.allclose(wrong, right)  # 10 tokens > a window of 4: the masks differ


def reload_and_compare(family: str, model, report, folder) -> str:
    """Save, reload (stock where the config states the widths, else trust_remote_code and
    load_pruned) and compare outputs; returns how it reloaded."""
    osscar_opt.save_pruned(model, folder, report=report)
    ids = token_ids(3, seed=5)
    expected = output_of(model, ids)
    loaded = osscar_opt.load_pruned(folder)
    torch.testing.assert_close(output_of(loaded, ids), expected, rtol=0, atol=1e-5)
    if report.settings["config_describes_pruned_model"]:
        stock = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        how = "stock"
    else:
        with pytest.raises(ValueError):
            transformers.AutoModelForCausalLM.from_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        if "auto_map" not in config:
            return "load_pruned"
        stock = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        how = "trust_remote_code"
    assert isinstance(stock, type(model))
    torch.testing.assert_close(output_of(stock, ids), expected, rtol=0, atol=1e-5)
    return how


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_a_uniform_budget_prunes_every_kind_exactly_and_reloads(family, tmp_path):
    model = build(family)
    budgets = dict.fromkeys(KINDS[family], 0.5)
    report = quiet_prune(model, budgets, save_problems=tmp_path / "problems")
    assert {record.kind for record in report.layers} == KINDS[family]
    problems = [LayerProblem.load(path) for path in (tmp_path / "problems").glob("*.safetensors")]
    problems = {problem.meta["name"]: problem for problem in problems}
    for record in report.layers:  # each layer's loss is its problem's loss at the kept groups
        problem = problems[record.name]
        assert record.loss == pytest.approx(problem.loss(record.kept), rel=1e-9, abs=1e-12)
        assert len(record.kept) == record.keep <= record.groups
    # the pruned model is the one its own config and state dict rebuild
    if report.settings["config_describes_pruned_model"]:
        rebuilt = type(model)(model.config).eval()
        rebuilt.load_state_dict(model.state_dict())
        ids = token_ids(3, seed=7)
        torch.testing.assert_close(output_of(rebuilt, ids), output_of(model, ids), rtol=0, atol=1e-6)
    how = reload_and_compare(family, model, report, tmp_path / "saved")
    assert how == ("stock" if family in STOCK_HEADS else "trust_remote_code")


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_a_params_target_is_met_and_the_folder_reloads(family, tmp_path):
    model = build(family)
    dense = sum(p.numel() for p in model.parameters())
    report = quiet_prune(model, CostTarget("params", 0.9, grid=8))
    allocation = report.settings["allocation"]
    assert allocation["target_met"] and sum(p.numel() for p in model.parameters()) <= 0.9 * dense
    reload_and_compare(family, model, report, tmp_path / "saved")


def test_an_unlisted_model_type_with_the_llama_layout_is_pruned_with_a_warning(tmp_path):
    model = build("helium")
    with pytest.warns(UserWarning, match=r"model_type 'helium' is not a listed family; it matches the LLaMA layout "
                                         r"\(self_attn.\{q,k,v,o\}_proj \+ mlp.\{gate,up,down\}_proj\)"):
        report = prune(model, token_ids(8), {"kv_groups": 0.5, "neurons": 0.5}, backend="greedy", damp=0.01,
                       progress=False)
    assert report.settings["architecture"] == "helium"
    assert reload_and_compare("helium", model, report, tmp_path / "saved") == "trust_remote_code"


def test_tied_embeddings_and_extra_norms_are_never_cut():
    model = build("gemma2")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = {name: tuple(p.shape) for name, p in model.named_parameters() if "norm" in name or "embed" in name}
    quiet_prune(model, {"kv_groups": 0.5, "q_heads": 0.5, "neurons": 0.5})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {name: tuple(p.shape) for name, p in model.named_parameters() if name in before} == before


@pytest.mark.parametrize(
    ("family", "budgets", "message"),
    [
        ("olmo2", {"kv_groups": 0.5, "neurons": 0.5}, r"prune \['kv_groups'\], but this olmo2 model has only "
                                                      r"\['neurons'\]"),
        ("olmo2", {"heads": 0.5}, r"prune \['heads'\], but this olmo2 model has only \['neurons'\]"),
        ("gpt_neox", {"heads": 0.5, "q_heads": 0.5}, r"prune \['q_heads'\], but this gpt_neox model has only "
                                                     r"\['heads', 'neurons'\] \(q_heads needs GQA"),
        ("qwen3", {"channels": 0.5, "neurons": 0.5}, r"prune \['channels'\], but this qwen3 model has only "
                                                     r"\['kv_groups', 'neurons', 'q_heads'\]"),
    ],
)
def test_a_kind_the_family_lacks_is_refused_naming_the_kinds_it_has(family, budgets, message):
    model = build(family)
    before = output_of(model, token_ids(2))
    with pytest.raises(ValueError, match=message):
        quiet_prune(model, budgets)
    assert torch.equal(output_of(model, token_ids(2)), before)


def test_a_target_naming_q_heads_on_a_model_without_gqa_is_refused():
    with pytest.raises(ValueError, match=r"prune \['q_heads'\].*q_heads needs GQA"):
        quiet_prune(build("gpt_neox"), CostTarget("params", 0.8, kinds=["heads", "q_heads"]))


def test_phi3_fused_projections_stay_fused_and_are_cut_by_rows():
    model = build("phi3")
    quiet_prune(model, {"kv_groups": 0.5, "neurons": 0.25})
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attention.qkv_proj, torch.nn.Linear) and isinstance(mlp.gate_up_proj, torch.nn.Linear)
    assert attention.qkv_proj.out_features == 2 * 8 + 2 * 8 and attention.o_proj.in_features == 16
    assert mlp.gate_up_proj.out_features == 2 * 36 and mlp.down_proj.in_features == 36
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1


def test_phi3_per_block_attention_widths_reload_with_load_pruned_only(tmp_path):
    from osscar_opt.budget import PerLayerKeep

    model = build("phi3")
    report = quiet_prune(model, PerLayerKeep({"model.layers.0.self_attn.o_proj": 1}))
    assert report.settings["config_describes_pruned_model"] is False
    assert reload_and_compare("phi3", model, report, tmp_path / "saved") == "load_pruned"
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "osscar_opt.load_pruned" in config["model_type"]
