"""GGUF export run by llama.cpp itself (llama-cpp-python): per-layer widths as ``deci``, uniform as ``llama``.

Tiny LLaMA / Qwen2 / Mistral models with other widths in every block, a byte-level BPE tokenizer
trained offline; llama.cpp's logits, greedy tokens and perplexity against torch's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

import osscar_opt  # noqa: E402
from osscar_opt.engines import llama_cpp as engine  # noqa: E402
from osscar_opt.evaluate import perplexity  # noqa: E402
from tests.tiny_llms import FAMILIES, held_out_ids, per_layer_pruned, tiny_llm, tokenizer, widths  # noqa: E402


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """Largest absolute difference over the largest absolute reference logit."""
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def gguf_fields(path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.ggml.") or key == "tokenizer.ggml.pre":
            out[key] = field.contents()
    return out


@torch.no_grad()
def torch_greedy(model, ids: list[int], count: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=count, min_new_tokens=count, do_sample=False,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def per_layer(request, tmp_path_factory):
    model = per_layer_pruned(request.param)
    assert len(set(widths(model))) == 3  # other widths in every block
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    result = osscar_opt.export(model, path, outtype="f32", tokenizer=tokenizer())
    return request.param, model, result


def test_per_layer_widths_are_written_as_deci_arrays_llama_cpp_reads(per_layer):
    _, model, result = per_layer
    fields = gguf_fields(result.path)
    assert fields["general.architecture"] == "deci" == result.details["arch"]
    assert [tuple(t) for t in zip(fields["deci.attention.head_count"], fields["deci.attention.head_count_kv"],
                                  fields["deci.feed_forward_length"], strict=True)] == widths(model)
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 16


def test_per_layer_f32_logits_match_torch_within_1e_3_relative(per_layer):
    _, model, result = per_layer
    ids = held_out_ids(64)
    llm = engine.open_model(result.path, n_ctx=128, threads=2, all_logits=True)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    assert relative_error(engine.logits(llm, ids), reference) < 1e-3


def test_per_layer_f32_greedy_tokens_are_the_same_16_as_torch(per_layer):
    _, model, result = per_layer
    ids = held_out_ids(24)
    llm = engine.open_model(result.path, n_ctx=64, threads=2)
    assert engine.greedy(llm, ids, 16) == torch_greedy(model, ids, 16)


def test_per_layer_f16_perplexity_within_1_percent_of_torch(per_layer, tmp_path):
    _, model, _ = per_layer
    path = osscar_opt.export(model, tmp_path / "f16.gguf", outtype="f16", tokenizer=tokenizer()).path
    windows = torch.tensor(held_out_ids(4 * 64)).view(4, 64)
    ours = engine.perplexity(path, windows.numpy(), threads=2)
    reference = perplexity(model, windows.reshape(-1), seq_len=64)
    assert abs(ours / reference - 1) < 0.01


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_widths_and_the_dense_model_are_plain_llama(family, tmp_path):
    model = tiny_llm(family)
    dense = osscar_opt.export(model, tmp_path / "dense.gguf", tokenizer=tokenizer())
    osscar_opt.prune(model, torch.tensor(held_out_ids(256)).view(8, 32), {"kv_groups": 0.5, "neurons": 0.25},
                     backend="greedy", damp=0.01, progress=False)
    uniform = osscar_opt.export(model, tmp_path / "uniform.gguf", tokenizer=tokenizer())
    ids = held_out_ids(48)
    for result, expected in ((dense, (4, 2, 96)), (uniform, (2, 1, 72))):
        fields = gguf_fields(result.path)
        assert fields["general.architecture"] == "llama"
        assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"],
                fields["llama.feed_forward_length"]) == expected
    llm = engine.open_model(uniform.path, n_ctx=64, threads=2, all_logits=True)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    assert relative_error(engine.logits(llm, ids), reference) < 1e-3


def test_mistral_context_is_capped_at_its_sliding_window(tmp_path):
    result = osscar_opt.export(tiny_llm("mistral"), tmp_path / "m.gguf", tokenizer=tokenizer())
    assert gguf_fields(result.path)["llama.context_length"] == 128
    assert any("sliding window" in note for note in result.notes)


def test_q8_0_quantizes_rows_of_32_and_keeps_the_others_f16_and_says_so(per_layer, tmp_path):
    _, model, _ = per_layer
    result = osscar_opt.export(model, tmp_path / "q8.gguf", outtype="q8_0", tokenizer=tokenizer())
    # down_proj rows are the kept neurons (40, 72, 24: not multiples of 32); all others are 64 wide
    assert sorted(result.details["f16_instead_of_q8_0"]) == [f"blk.{i}.ffn_down.weight" for i in range(3)]
    assert "f16" in result.summary()
    ids = held_out_ids(48)
    llm = engine.open_model(result.path, n_ctx=64, threads=2, all_logits=True)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    assert relative_error(engine.logits(llm, ids), reference) < 0.05


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "qwen2", "llama-bpe"])
def test_llama_cpp_splits_text_into_the_same_tokens_as_the_tokenizer(pre, tmp_path):
    hf = tokenizer(pre)
    result = osscar_opt.export(tiny_llm("llama"), tmp_path / "t.gguf", tokenizer=hf)
    assert result.details["tokenizer_pre"] == pre
    llm = engine.open_model(result.path, n_ctx=32, threads=1)
    text = "The 2024 budget: 1,234.5 units!\n\n  Don't   panic -- it's fine.\tTabs\nand ÜNICODE café 3.14159"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf(text)["input_ids"]


def test_a_saved_folder_exports_from_the_command_line(tmp_path, capsys):
    from osscar_opt import cli

    model = per_layer_pruned("qwen2")
    osscar_opt.save_pruned(model, tmp_path / "folder", tokenizer=tokenizer())
    assert cli.main(["export", str(tmp_path / "folder"), str(tmp_path / "out.gguf"), "--outtype", "f16"]) == 0
    assert "architecture deci, f16" in capsys.readouterr().out
    llm = engine.open_model(tmp_path / "out.gguf", n_ctx=64, threads=2, all_logits=True)
    ids = held_out_ids(32)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    assert relative_error(engine.logits(llm, ids), reference) < 1e-2
    assert math.isfinite(float(np.abs(reference).max()))


def test_llama3_rotary_scaling_is_written_as_llama_cpp_frequency_factors(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                                         initializer_range=0.1, rope_parameters=rope)).eval()
    result = osscar_opt.export(model, tmp_path / "l3.gguf", tokenizer=tokenizer())
    assert result.details["tensor_types"]["f32"] == len(list(model.parameters())) + 1  # + rope_freqs
    ids = held_out_ids(96)
    llm = engine.open_model(result.path, n_ctx=128, threads=2, all_logits=True)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    assert relative_error(engine.logits(llm, ids), reference) < 1e-3
