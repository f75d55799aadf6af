"""Whole sublayers removed (issue 25, ``allow_empty``): a keep of 0 replaces an attention layer or
MLP of the LLaMA layout by its (re-fit) bias or zero. On every LLaMA-layout family the emptied model
computes exactly what the model with that consumer zeroed computes, loses the sublayer's
parameters, generates the same with and without its KV cache, and saves and reloads with the same
outputs; an exactly redundant attention layer is removed by the allocation and kept removed by the
search; llama.cpp runs the exported GGUF; families that cannot drop a sublayer are refused."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import osscar_opt
from osscar_opt import cli
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.allocate import Choices
from osscar_opt.allocation_search import AllocationSearch, search_allocation
from osscar_opt.budget import CostTarget, PerLayerKeep
from osscar_opt.formulations.empty import EmptySublayer
from osscar_opt.formulations.surgery import apply_solution, mask_solution
from osscar_opt.pipeline import prune
from tests.test_cost_targets import one_thread  # noqa: F401 - tiny tensors: one thread (autouse)
from tests.tiny_families import tiny_decoder
from tests.tiny_llms import calibration as llm_calibration
from tests.tiny_llms import tiny_llm
from tests.tiny_models import build
from tests.tiny_models import calibration as tiny_calibration

LLAMA_LAYOUT = ("llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text", "smollm3", "granite", "olmo2", "helium")
"""Every LLaMA-layout family with a tiny config (OLMo 2's attention is not a structure: only its MLP empties)."""


def decoder(family: str, **overrides) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # helium: "not a listed family"
        if family in ("llama", "qwen2", "mistral") and not overrides:
            return tiny_llm(family)
        return tiny_decoder(family, **overrides)


def ids(model: torch.nn.Module, shape=(6, 12), seed: int = 0) -> torch.Tensor:
    high = min(int(model.config.vocab_size), 100)
    return torch.randint(3, high, shape, generator=torch.Generator().manual_seed(seed))


def emptied_keeps(model: torch.nn.Module) -> dict[str, int]:
    """Block 0's attention (where it is a structure) and the last block's MLP, emptied."""
    structures = adapter_for(model).structures()
    attention = [s.name for s in structures if s.kind in ("heads", "kv_groups")]
    mlps = [s.name for s in structures if s.kind == "neurons"]
    return {**({attention[0]: 0} if attention else {}), mlps[-1]: 0}


def zeroed(model: torch.nn.Module, names) -> torch.nn.Module:
    """A copy of ``model`` whose consumers ``names`` have zero weights (what an emptied sublayer adds)."""
    twin = copy.deepcopy(model)
    for structure in adapter_for(twin).structures():
        if structure.name in names:
            with torch.no_grad():
                structure.consumer.weight.zero_()
    return twin


@torch.no_grad()
def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits


@pytest.mark.parametrize("family", LLAMA_LAYOUT)
def test_an_emptied_sublayer_computes_what_its_zeroed_consumer_does_and_its_parameters_are_gone(family, tmp_path):
    model = decoder(family)
    keeps = emptied_keeps(model)
    reference = zeroed(model, keeps)
    dense_parameters = sum(p.numel() for p in model.parameters())
    report = prune(model, ids(model), PerLayerKeep(keeps), backend="greedy", damp=0.01, batch_size=3, progress=False)
    assert {r.name: r.keep for r in report.layers if r.keep == 0} == keeps
    blocks = adapter_for(model).blocks()
    emptied = [m for block in blocks for m in block.modules() if isinstance(m, EmptySublayer)]
    assert len(emptied) == len(keeps)
    removed = sum(p.numel() for p in reference.parameters()) - sum(p.numel() for p in model.parameters())
    consumers = sum(s.consumer.weight.numel() for s in adapter_for(reference).structures() if s.name in keeps)
    assert removed > consumers and dense_parameters - removed == sum(p.numel() for p in model.parameters())
    tokens = ids(model, (2, 10), seed=1)
    torch.testing.assert_close(logits(model, tokens), logits(reference, tokens), atol=1e-5, rtol=1e-5)
    dims = adapter_for(model).dims()
    assert any(0 in block.values() for block in dims)
    osscar_opt.save_pruned(model, tmp_path / "folder")
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert "removed sublayers: load it with osscar_opt.load_pruned" in config["model_type"]
    assert "auto_map" not in config  # the remote-code module cannot build an emptied sublayer
    reloaded = osscar_opt.load_pruned(tmp_path / "folder")
    assert torch.equal(logits(reloaded, tokens), logits(model, tokens))
    assert adapter_for(reloaded).dims() == dims


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generation_with_the_kv_cache_counts_the_positions_of_an_emptied_attention(family):
    model = decoder(family)
    prune(model, ids(model), PerLayerKeep(emptied_keeps(model)), backend="greedy", damp=0.01, batch_size=3,
          progress=False)
    prompt = ids(model, (1, 8), seed=2)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_an_emptied_attention_with_a_bias_keeps_its_re_fit_bias_and_reloads(tmp_path):
    model = decoder("qwen3", attention_bias=True)
    name = adapter_for(model).structures()[0].name
    report = prune(model, ids(model), PerLayerKeep({name: 0}), backend="greedy", damp=0.01, batch_size=3,
                   progress=False)
    empty = adapter_for(model).blocks()[0].self_attn
    assert isinstance(empty, EmptySublayer) and empty.bias is not None
    record = next(r for r in report.layers if r.name == name)
    assert record.keep == 0 and record.backend == "empty" and 0 < record.relative_loss <= 1
    tokens = ids(model, (2, 10), seed=1)
    osscar_opt.save_pruned(model, tmp_path / "folder")
    assert torch.equal(logits(osscar_opt.load_pruned(tmp_path / "folder"), tokens), logits(model, tokens))


def test_a_masked_candidate_at_keep_0_equals_the_emptied_model():
    model = decoder("llama")
    masked, cut = copy.deepcopy(model), copy.deepcopy(model)
    for left, right in zip(adapter_for(masked).structures(), adapter_for(cut).structures(), strict=True):
        if left.name in emptied_keeps(model):
            mask_solution(left, (), left.weight())
            apply_solution(right, (), right.weight())
    tokens = ids(model, (2, 10), seed=3)
    torch.testing.assert_close(logits(masked, tokens), logits(cut, tokens), atol=1e-5, rtol=1e-5)


def redundant_attention_llm() -> torch.nn.Module:
    """A tiny LLaMA whose block 1 attention adds exactly nothing (its output projection is zero)."""
    model = tiny_llm("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    return model


@pytest.mark.parametrize("search", [False, True])
def test_an_exactly_redundant_attention_layer_is_removed_by_the_allocation_and_the_search(search):
    model = redundant_attention_llm()
    dense = copy.deepcopy(model)
    searched = AllocationSearch(llm_calibration(8, 32), evaluations=8) if search else None
    target = CostTarget("macs", 0.8, kinds=["kv_groups", "neurons"], allow_empty=True, search=searched)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune(model, llm_calibration(16, 32), target, backend="greedy", batch_size=4, progress=False)
    advised = [w for w in caught if "allow_empty: without an allocation search" in str(w.message)]
    assert len(advised) == (0 if search else 1)
    allocation = report.settings["allocation"]
    assert "model.layers.1.self_attn.o_proj" in allocation["emptied"]
    assert allocation["keep"]["model.layers.1.self_attn.o_proj"] == 0
    assert allocation["target_met"] and allocation["achieved_fraction"] <= 0.8 + 1e-9
    assert isinstance(model.model.layers[1].self_attn, EmptySublayer)
    if search:  # started from the better scored of the program's allocations with and without removals
        starts = allocation["search"]["start_scores"]
        assert set(starts) == {"program", "program_without_empty"}
        assert allocation["search"]["start_score"] == pytest.approx(min(starts.values()), rel=1e-6)
        assert allocation["search"]["score"] <= allocation["search"]["start_score"]
    without = CostTarget("macs", 0.8, kinds=["kv_groups", "neurons"])
    prune(dense, llm_calibration(16, 32), without, backend="greedy", batch_size=4, progress=False)
    assert not any(isinstance(m, EmptySublayer) for m in dense.modules())  # off by default


def test_the_search_moves_a_redundant_structure_to_zero_and_spends_its_budget_elsewhere():
    keeps = [0, 2, 3, 4]
    choices = [Choices(name, "kv_groups", keeps, [0.0] * 4, [float(k - 4) for k in keeps]) for name in ("a", "b")]
    start = {"a": 2, "b": 2}

    def score(keep, share):  # "a" adds nothing; "b" is better the more it keeps
        return 1.0 / (1 + keep["b"]), share

    result = search_allocation(choices, start, lambda keep: sum(k - 4.0 for k in keep.values()), -4.0, score,
                               AllocationSearch(torch.zeros(4, 2), evaluations=16))
    assert result.keep == {"a": 0, "b": 4}
    assert result.score < result.start_score


def test_llama_cpp_runs_an_exported_model_with_removed_sublayers(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from osscar_opt.engines import llama_cpp as engine
    from tests.tiny_llms import held_out_ids, tokenizer

    model = tiny_llm("qwen2")
    keep = {"model.layers.0.self_attn.o_proj": 0, "model.layers.0.mlp.down_proj": 0,  # block 0: zero sublayers
            "model.layers.1.self_attn.o_proj": 0, "model.layers.1.mlp.down_proj": 0,  # block 1: gone
            "model.layers.2.mlp.down_proj": 0}  # attention without an MLP
    prune(model, llm_calibration(), PerLayerKeep(keep), backend="greedy", damp=0.01, batch_size=4, progress=False)
    result = osscar_opt.export(model, tmp_path / "m.gguf", outtype="f32", tokenizer=tokenizer())
    assert result.details["arch"] == "deci"
    assert [(w["heads"], w["neurons"]) for w in result.details["layers"]] == [(1, 1), (0, 0), (4, 1)]
    tokens = held_out_ids(48)
    llm = engine.open_model(result.path, n_ctx=64, threads=2, all_logits=True)
    reference = logits(model, torch.tensor([tokens]))[0].numpy()
    ours = engine.logits(llm, tokens)
    assert abs(ours - reference).max() / abs(reference).max() < 1e-3


@pytest.mark.parametrize("name", ["bert", "gpt2", "opt"])
def test_allow_empty_is_refused_for_a_family_that_cannot_drop_a_sublayer(name):
    model = build(name)
    target = CostTarget("macs", 0.7, allow_empty=True)
    family = adapter_for(model).family
    with pytest.raises(ValueError, match=f"allow_empty: the {family} family"):
        prune(model, tiny_calibration(name), target, backend="greedy", batch_size=4, progress=False)
    first = adapter_for(model).structures()[0].name
    with pytest.raises(ValueError, match=f"0 would remove the sublayer, which the {family} family"):
        prune(model, tiny_calibration(name), PerLayerKeep({first: 0}), backend="greedy", batch_size=4,
              progress=False)


def test_a_saved_zero_width_is_refused_where_the_family_cannot_empty():
    model = build("bert")
    dims = adapter_for(model).dims()
    dims[0]["mlp_neurons"] = 0
    with pytest.raises(ValueError, match="mlp_neurons = 0; expected an integer from 1"):
        adapter_for(build("bert")).restore_dims(dims)


def test_bad_allow_empty_settings_are_refused():
    with pytest.raises(ValueError, match="allow_empty: expected True or False"):
        CostTarget("macs", 0.7, allow_empty="yes")
    with pytest.raises(ValueError, match="allow_empty: removes whole sublayers"):
        CostTarget("macs", 0.7, allow_empty=True, allocation="uniform")
    with pytest.raises(ValueError, match="keep\\['x'\\]: expected a non-negative integer"):
        PerLayerKeep({"x": -1})


@pytest.mark.parametrize("argv, message", [
    (["--allow-empty", "--heads-sparsity", "0.5"], "--allow-empty: applies only with --target"),
    (["--allow-empty", "--target-macs", "0.7", "--uniform-widths"], "--allow-empty: removes sublayers"),
])
def test_the_cli_refuses_allow_empty_without_a_per_layer_target(argv, message, capsys, tmp_path):
    code = cli.main(["prune", "--model", "smollm2", *argv, "--output", str(tmp_path / "out")])
    assert code != 0
    assert message in capsys.readouterr().err
