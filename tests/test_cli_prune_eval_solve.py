"""`osscar prune / eval / solve` end to end on a tiny local BERT folder, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import BertConfig, BertModel, GPTJConfig, GPTJForCausalLM

from osscar_opt import cli
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.models import minilm_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory):
    """A random 2-block BERT saved as a Hugging Face folder with the MiniLM tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, architectures=["BertModel"])
    BertModel(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (minilm_path() / name).exists():
            shutil.copy(minilm_path() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def pruned_run(tiny_bert_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = ["prune", "--model", str(tiny_bert_folder), "--heads-sparsity", "0.5", "--neurons-sparsity", "0.5",
            "--samples", "8", "--seq-len", "16", "--batch-size", "4", "--backend", "greedy", "--quiet",
            "--output", str(out / "model"), "--report", str(out / "report.json"),
            "--save-problems", str(out / "problems")]
    assert cli.main(argv) == 0
    return out


def test_prune_writes_model_report_and_problems(pruned_run, capsys):
    report = json.loads((pruned_run / "report.json").read_text())
    assert [layer["keep"] for layer in report["layers"]] == [2, 24, 2, 24]
    assert [layer["stage"] for layer in report["layers"]] == [0, 0, 1, 1]
    assert all(len(layer["kept"]) == layer["keep"] for layer in report["layers"])
    settings = report["settings"]
    assert settings["budgets"] == {"heads": 0.5, "kv_groups": 0.5, "neurons": 0.5}
    assert settings["architecture"] == "bert" and settings["samples"] == 8 and settings["sample_shape"] == [16]
    assert all(layer["loss"] >= 0 and layer["solve_seconds"] >= 0 for layer in report["layers"])
    assert report["pruned"]["params"] < report["dense"]["params"]
    assert report["pruned"]["macs"] < report["dense"]["macs"]
    assert 0 < report["pruned"]["cosine_to_dense"] <= 1 and "retrieval_top1" in report["pruned"]
    assert len(list((pruned_run / "problems").glob("*.safetensors"))) == 4
    assert (pruned_run / "model" / "tokenizer.json").exists()


@pytest.mark.slow
def test_eval_compares_the_saved_model_with_its_reference(pruned_run, tiny_bert_folder, capsys):
    argv = ["eval", str(pruned_run / "model"), "--reference", str(tiny_bert_folder), "--seq-len", "16", "--json"]
    assert cli.main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    report = json.loads((pruned_run / "report.json").read_text())
    assert document["result"]["params"] == report["pruned"]["params"]
    assert document["result"]["cosine_to_dense"] == pytest.approx(report["pruned"]["cosine_to_dense"], abs=1e-5)


@pytest.mark.slow
def test_solve_re_solves_saved_problems_with_another_backend(pruned_run, capsys):
    assert cli.main(["solve", str(pruned_run / "problems"), "--backend", "local-search", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    report = json.loads((pruned_run / "report.json").read_text())
    assert [r["keep"] for r in rows] == [2, 24, 2, 24]
    assert {r["kind"] for r in rows} == {"heads", "neurons"}
    # local search is at least as good as greedy on the same problems, within round-off
    for row, layer in zip(rows, report["layers"], strict=True):
        assert row["name"] == layer["name"]
        assert row["loss"] <= layer["loss"] * (1 + 1e-6) + 1e-9
    assert cli.main(["solve", str(pruned_run / "problems"), "--backend", "magnitude", "--sparsity", "0.25"]) == 0
    assert "4 problems" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "/no/such/model/folder"], "model: '/no/such/model/folder' is not a local folder"),
        (["--heads-sparsity", "1.0"], "heads_sparsity: expected a fraction in [0, 1)"),
        (["--neurons-sparsity", "-0.1"], "neurons_sparsity: expected a fraction in [0, 1)"),
        (["--seq-len", "0"], "seq_len: expected a positive integer"),
        (["--samples", "0"], "samples: expected a positive integer"),
        (["--backend", "no-such-backend"], "backend: unknown backend 'no-such-backend'"),
        (["--channels-sparsity", "0.5"], "model: --channels-sparsity and --weights apply to torchvision"),
    ],
)
def test_bad_prune_arguments_are_clean_errors(tiny_bert_folder, extra, message, capsys):
    argv = ["prune", "--model", str(tiny_bert_folder), "--samples", "4", "--seq-len", "8", "--quiet", *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, capsys):
    config = GPTJConfig(n_layer=1, n_embd=16, n_head=2, rotary_dim=4, vocab_size=50, bos_token_id=0, eos_token_id=0)
    GPTJForCausalLM(config).save_pretrained(tmp_path / "gptj")
    assert cli.main(["prune", "--model", str(tmp_path / "gptj"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'gptj'" in err
    assert all(name in err for name in ("bert", "gpt2", "gpt_neox", "llama", "opt", "phi3", "LLaMA layout"))
    with pytest.raises(ValueError, match="supported: bert"):
        adapter_for(GPTJForCausalLM(config))


def test_empty_calibration_text_is_a_clean_error(tiny_bert_folder, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    argv = ["prune", "--model", str(tiny_bert_folder), "--calib-text", str(tmp_path / "empty.txt"), "--seq-len", "16",
            "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "calib_text:" in err and "empty" in err

