"""SmolLM2-135M (real weights, LLaMA with GQA: 9 query heads over 3 KV heads, 30 blocks).

Note: the SmolLM2 weights were 4-bit quantized (GGUF Q4_1) upstream and are dequantized on load.
To stay inside the CI budget: 8 calibration samples of 64 tokens, perplexity on 4 windows of 128
tokens, and the local search runs without restarts, with 1 removal stage and at most
3 swap moves (it is still the staged-removal + exact-swap search).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import osscar_opt
from osscar_opt import evaluate
from osscar_opt.data import text
from osscar_opt.models import SMOLLM2_NOTE, load_model
from osscar_opt.pipeline import prune

pytestmark = pytest.mark.slow
FAST_LOCAL_SEARCH = {"restarts": 0, "stages": 1, "max_swaps": 3}
WINDOWS = 4


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model("smollm2", device="cpu")
    calibration = text.calibration_ids(loaded.tokenizer, text.load_texts(None, "calib", True), 8, 64)
    eval_data = evaluate.make_eval_data(loaded.tokenizer, text.load_texts(None, "eval", True), True,
                                        seq_len=128, max_windows=WINDOWS)
    dense_ppl = evaluate.perplexity(loaded.model, eval_data.stream, 128, max_windows=WINDOWS)
    return loaded, calibration, eval_data, dense_ppl


@pytest.fixture(scope="module")
def pruned_pair(smollm2):
    loaded, calibration, eval_data, dense_ppl = smollm2
    models = {}
    for backend, options in (("local-search", FAST_LOCAL_SEARCH), ("magnitude", {})):
        model = copy.deepcopy(loaded.model)
        prune(model, calibration, {"kv_groups": 0.25, "neurons": 0.25}, backend=backend,
              backend_options=options, batch_size=8, progress=False)
        models[backend] = model
    return models


def test_pruned_smollm2_generates_and_its_perplexity_is_reported(smollm2, pruned_pair):
    loaded, _, eval_data, dense_ppl = smollm2
    ppl = {name: evaluate.perplexity(m, eval_data.stream, 128, max_windows=WINDOWS) for name, m in pruned_pair.items()}
    print(f"\nSmolLM2-135M, 1 of 3 KV groups + 25% neurons per block ({SMOLLM2_NOTE}): perplexity dense "
          f"{dense_ppl:.2f}, local-search {ppl['local-search']:.2f}, magnitude {ppl['magnitude']:.2f}")
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["local-search"] < ppl["magnitude"]
    model = pruned_pair["local-search"]
    for layer in model.model.layers:
        assert layer.self_attn.k_proj.out_features == 2 * layer.self_attn.head_dim
        assert layer.self_attn.q_proj.out_features == 6 * layer.self_attn.head_dim
        assert layer.mlp.down_proj.in_features == 1152
    prompt = loaded.tokenizer("The king said", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8


def test_pruned_smollm2_reloads_with_identical_logits(pruned_pair, tmp_path):
    model = pruned_pair["local-search"]
    osscar_opt.save_pruned(model, tmp_path / "smollm2")
    reloaded = osscar_opt.load_pruned(tmp_path / "smollm2")
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    ids = torch.arange(5, 37).view(2, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_pruned_smollm2_reloads_with_the_stock_class_and_generates_the_same_text(smollm2, pruned_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = smollm2[0]
    model = pruned_pair["local-search"]
    osscar_opt.save_pruned(model, tmp_path / "smollm2", tokenizer=loaded.tokenizer)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "smollm2")
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (6, 2)
    assert stock.config.intermediate_size == 1152 and stock.config.head_dim == 64
    assert not hasattr(stock.config, "quantization_config")
    prompt = tokenizer("The king said", return_tensors="pt")
    ids = torch.arange(5, 37).view(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    generated = [m.generate(**prompt, max_new_tokens=8, do_sample=False) for m in (stock, model)]
    assert torch.equal(generated[0], generated[1])


def test_per_layer_smollm2_reloads_with_stock_transformers_and_trust_remote_code(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from osscar_opt.budget import PerLayerKeep

    loaded, calibration, _, _ = smollm2
    model = copy.deepcopy(loaded.model)
    keep = {"model.layers.3.mlp.down_proj": 512, "model.layers.7.self_attn.o_proj": 1,
            "model.layers.20.mlp.down_proj": 1024}
    report = prune(model, calibration, PerLayerKeep(keep), backend="magnitude", batch_size=8, progress=False)
    assert report.settings["config_describes_pruned_model"] is False
    osscar_opt.save_pruned(model, tmp_path / "per-layer", tokenizer=loaded.tokenizer, report=report)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "per-layer")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "per-layer", trust_remote_code=True).eval()
    assert stock.model.layers[3].mlp.down_proj.in_features == 512
    ids = calibration[:2]
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
