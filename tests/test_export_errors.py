"""Bad input to ``osscar_opt.export`` / ``osscar export``: refused before any work, with a clear message,
and never a partial or replaced file."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

import osscar_opt  # noqa: E402
from osscar_opt import cli  # noqa: E402
from tests.tiny_llms import tiny_llm, tokenizer  # noqa: E402
from tests.tiny_transformers import tiny_model  # noqa: E402


def export_tiny(path, **kwargs):
    return osscar_opt.export(tiny_llm("llama"), path, **{"tokenizer": tokenizer(), **kwargs})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"format": "safetensors"}, "format: expected one of gguf, onnx, got 'safetensors'"),
    ({"outtype": "q4_k"}, "outtype: expected one of f32, f16, q8_0, got 'q4_k'"),
    ({"format": "onnx", "outtype": "f16"}, "outtype: ONNX export writes float32"),
])
def test_unknown_format_or_outtype_is_refused_naming_the_supported_ones(kwargs, message, tmp_path):
    suffix = ".onnx" if kwargs.get("format") == "onnx" else ".gguf"
    with pytest.raises(ValueError, match=message):
        export_tiny(tmp_path / f"out{suffix}", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "notes.gguf").write_text("my notes")
    (tmp_path / "folder.gguf").mkdir()
    for path, message in ((tmp_path / "out.bin", "a GGUF file name ends in .gguf"),
                          (tmp_path / "folder.gguf", "is a folder"),
                          (tmp_path / "notes.gguf", "is not a GGUF file; not replacing it"),
                          ("", "expected a file path")):
        with pytest.raises(ValueError, match=message):
            export_tiny(path, format="gguf")
    with pytest.raises(ValueError, match="format: not given and path .*out.bin' does not end in .gguf or .onnx"):
        export_tiny(tmp_path / "out.bin")
    assert (tmp_path / "notes.gguf").read_text() == "my notes"


def test_an_earlier_gguf_is_replaced(tmp_path):
    first = export_tiny(tmp_path / "m.gguf")
    second = export_tiny(tmp_path / "m.gguf", outtype="f16")
    assert second.bytes < first.bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import gguf

    old = export_tiny(tmp_path / "m.gguf").path.read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_tiny(tmp_path / "m.gguf", outtype="f16")
    with pytest.raises(OSError, match="No space left"):
        export_tiny(tmp_path / "new.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert (tmp_path / "m.gguf").read_bytes() == old


def test_unsupported_families_are_refused_naming_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match=r"GGUF export supports LLaMA-family causal LMs \(llama, qwen2, mistral\); "
                                         r"got a BertModel"):
        osscar_opt.export(tiny_model("bert"), tmp_path / "b.gguf", tokenizer=tokenizer())
    with pytest.raises(ValueError, match="got a OPTForCausalLM"):
        osscar_opt.export(tiny_model("opt"), tmp_path / "o.gguf", tokenizer=tokenizer())


def test_a_model_whose_pruning_failed_part_way_is_refused(tmp_path):
    model = tiny_llm("llama")
    model.osscar_state = "incomplete"
    with pytest.raises(ValueError, match="pruning failed part-way"):
        osscar_opt.export(model, tmp_path / "m.gguf", tokenizer=tokenizer())


def test_a_parameter_llama_cpp_has_no_place_for_is_refused(tmp_path):
    model = tiny_llm("llama")
    model.model.layers[1].self_attn.q_norm = torch.nn.LayerNorm(16)
    with pytest.raises(ValueError, match=r"without a place in llama.cpp's llama / deci: model.layers.1.self_attn.q_n"):
        osscar_opt.export(model, tmp_path / "m.gguf", tokenizer=tokenizer())


def test_rotary_scalings_llama_cpp_cannot_apply_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=96, max_position_embeddings=256,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rotary scaling 'dynamic'"):
        osscar_opt.export(LlamaForCausalLM(config), tmp_path / "m.gguf", tokenizer=tokenizer())


def test_a_missing_or_foreign_tokenizer_is_a_clear_error_and_no_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(ValueError, match="tokenizer: GGUF export needs the model's tokenizer"):
        osscar_opt.export(tiny_llm("llama"), tmp_path / "m.gguf")
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.train_from_iterator(["some words to learn from"] * 4,
                                  trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]"],
                                                            show_progress=False))
    with pytest.raises(ValueError, match="tokenizer: cannot be carried over to GGUF: its model is 'WordPiece'"):
        export_tiny(tmp_path / "m.gguf", tokenizer=PreTrainedTokenizerFast(tokenizer_object=wordpiece))
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=96))
    with pytest.raises(ValueError, match="has token id 319, but the model has 100 embedding rows"):
        osscar_opt.export(small, tmp_path / "m.gguf", tokenizer=tokenizer())


@pytest.mark.parametrize(("argv", "message"), [
    (["export", "missing-folder", "out.gguf"], "folder: missing-folder is not a folder"),
    (["export", ".", "out.txt"], "--format: not given and OUT 'out.txt' does not end in .gguf or .onnx"),
    (["export", ".", "out.gguf", "--outtype", "q4"], "outtype: expected one of f32, f16, q8_0, got 'q4'"),
])
def test_the_command_refuses_bad_arguments_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith("osscar export: error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
