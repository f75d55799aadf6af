"""``osscar eval --engine``: speed measured in llama.cpp, ONNX Runtime or eager torch (median and range,
threads and batch stated), llama.cpp's perplexity on torch's windows, bad input refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

from transformers import BertConfig, BertModel  # noqa: E402

import osscar_opt  # noqa: E402
from osscar_opt import cli, evaluate  # noqa: E402
from osscar_opt.engines import measure  # noqa: E402
from tests.tiny_llms import passages, per_layer_pruned, tiny_llm, tokenizer  # noqa: E402

SPEED = ["--repeats", "2", "--prompt-tokens", "16", "--generate", "4", "--seq-len", "32", "--max-windows", "3",
         "--threads", "2", "--json"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    osscar_opt.save_pruned(tiny_llm("llama"), root / "dense", tokenizer=tokenizer())
    osscar_opt.save_pruned(per_layer_pruned("llama"), root / "pruned", tokenizer=tokenizer())
    (root / "eval.txt").write_text("\n\n".join(passages()[400:460]))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=64)).eval()
    osscar_opt.save_pruned(bert, root / "bert", tokenizer=tokenizer())
    return root


def run_json(argv, capsys) -> dict:
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def assert_spread(value: dict, runs: int) -> None:
    assert value["runs"] == runs and 0 < value["min"] <= value["median"] <= value["max"]


def test_llama_cpp_measures_tokens_per_second_and_torch_windows_perplexity(folders, capsys):
    argv = ["eval", str(folders / "pruned"), "--reference", str(folders / "dense"), "--engine", "llama.cpp",
            "--eval-text", str(folders / "eval.txt"), *SPEED]
    document = run_json(argv, capsys)
    result, reference = document["result"], document["reference"]
    assert result["engine"] == "llama.cpp" and result["threads"] == 2 and result["arch"] == "deci"
    assert reference["arch"] == "llama"
    for key in ("prompt_tokens_per_s", "generation_tokens_per_s"):
        assert_spread(result[key], 2)
    # the same windows as torch's evaluation, scored by llama.cpp (f32 file, f32 KV cache)
    model = osscar_opt.load_pruned(folders / "pruned")
    stream = evaluate.make_eval_data(tokenizer(), [str((folders / "eval.txt").read_text())], True, seq_len=32).stream
    windows = measure.windows_of(stream, 32, 3)
    assert windows.shape == (3, 32)
    torch_ppl = evaluate.perplexity(model, windows.reshape(-1), 32, max_windows=None)
    assert abs(result["perplexity"] / torch_ppl - 1) < 1e-4


def test_torch_engine_reports_the_same_rows_and_the_table_says_threads_and_runs(folders, capsys):
    argv = ["eval", str(folders / "pruned"), "--engine", "torch", "--eval-text", str(folders / "eval.txt"),
            *SPEED[:-1]]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "engine torch; 2 threads; median (range) of 2 runs after 1 warm-up; prompt 16 tokens, 4 generated" in out
    assert "generation tokens/s" in out and "perplexity" in out


def test_onnxruntime_measures_latency_per_batch_of_an_encoder(folders, capsys):
    argv = ["eval", str(folders / "bert"), "--engine", "onnxruntime", "--batch", "3", "--seq-len", "16",
            "--repeats", "3", "--threads", "1", "--json"]
    result = run_json(argv, capsys)["result"]
    assert result["engine"] == "onnxruntime" and result["batch"] == [3, 16] and result["threads"] == 1
    assert_spread(result["latency_ms"], 3)
    assert result["max_abs_difference_to_torch"] < 1e-4


@pytest.mark.parametrize(("extra", "message"), [
    (["--engine", "vllm"], "--engine: expected one of torch, llama.cpp, onnxruntime, got 'vllm'"),
    (["--engine", "onnxruntime"], "engine: onnxruntime does not run a causal LM here; use torch or llama.cpp"),
    (["--engine", "llama.cpp", "--outtype", "q4"], "--outtype: expected one of f32, f16, q8_0, got 'q4'"),
    (["--engine", "llama.cpp", "--generate", "1"], "--generate: expected at least 2 tokens, got 1"),
    (["--engine", "llama.cpp", "--repeats", "0"], "--repeats"),
])
def test_bad_engine_arguments_are_one_line_errors(folders, extra, message, capsys):
    argv = ["eval", str(folders / "dense"), "--eval-text", str(folders / "eval.txt"), *extra]
    assert cli.main(argv) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_llama_cpp_refuses_an_encoder(folders, capsys):
    argv = ["eval", str(folders / "bert"), "--engine", "llama.cpp"]
    assert cli.main(argv) == cli.EXIT_INPUT
    assert "llama.cpp does not run an encoder here; use torch or onnxruntime" in capsys.readouterr().err


def test_torch_speed_restores_the_thread_setting():
    from osscar_opt.engines.torch_speed import llm_speed

    before = torch.get_num_threads()
    result = llm_speed(tiny_llm("llama"), list(range(5, 21)), 3, repeats=1, threads=1)
    assert result["threads"] == 1 and torch.get_num_threads() == before


def test_generation_rounds_time_files_interleaved_against_the_first(folders, tmp_path):
    from osscar_opt.engines import llama_cpp

    paths = [osscar_opt.export(folders / name, tmp_path / f"{name}.gguf").path for name in ("dense", "pruned")]
    results = llama_cpp.generation_rounds(paths, list(range(5, 21)), 4, rounds=3, threads=1)
    assert [r["path"] for r in results] == [str(p) for p in paths]
    assert results[0]["against_first"] == {"median": 1.0, "min": 1.0, "max": 1.0, "runs": 3}
    assert_spread(results[1]["generation_tokens_per_s"], 3)
    assert results[1]["against_first"]["runs"] == 3 and results[1]["against_first"]["median"] > 0
