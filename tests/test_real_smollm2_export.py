"""SmolLM2-135M exported to GGUF and run by llama.cpp: dense as ``llama``, per-layer widths as ``deci``.

The per-layer model keeps other widths in every block (``PerLayerKeep``, solved by the greedy
backend on 8 calibration samples of 64 tokens, to stay quick); llama.cpp's f32 logits and greedy
tokens are compared with torch's, its f16 perplexity on 4 windows of 128 tokens with torch's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")

import osscar_opt  # noqa: E402
from osscar_opt import evaluate  # noqa: E402
from osscar_opt.budget import PerLayerKeep  # noqa: E402
from osscar_opt.data import text  # noqa: E402
from osscar_opt.engines import llama_cpp as engine  # noqa: E402
from osscar_opt.models import load_model  # noqa: E402

pytestmark = pytest.mark.slow
WINDOWS, SEQ_LEN = 4, 128


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model("smollm2", device="cpu")
    eval_data = evaluate.make_eval_data(loaded.tokenizer, text.load_texts(None, "eval", True), True,
                                        seq_len=SEQ_LEN, max_windows=WINDOWS)
    return loaded, eval_data


@pytest.fixture(scope="module")
def per_layer(smollm2):
    loaded, _ = smollm2
    model = copy.deepcopy(loaded.model)
    keep = {}
    for index in range(len(model.model.layers)):
        keep[f"model.layers.{index}.mlp.down_proj"] = 640 + 29 * index  # 640 ... 1481 of 1536
        keep[f"model.layers.{index}.self_attn.o_proj"] = 1 + index % 3  # 1, 2 or 3 of 3 KV groups
    calibration = text.calibration_ids(loaded.tokenizer, text.load_texts(None, "calib", True), 8, 64)
    osscar_opt.prune(model, calibration, PerLayerKeep(keep), backend="greedy", batch_size=8, progress=False)
    return model


def ids_of(eval_data, count: int) -> list[int]:
    return eval_data.stream[:count].tolist()


def assert_runs_like_torch(model, path, eval_data):
    ids = ids_of(eval_data, 64)
    llm = engine.open_model(path, n_ctx=128, all_logits=True)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    error = float(np.abs(engine.logits(llm, ids) - reference).max() / np.abs(reference).max())
    assert error < 1e-3
    prompt = ids[:24]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                  pad_token_id=0)[0, 24:].tolist()
    assert engine.greedy(engine.open_model(path, n_ctx=64), prompt, 16) == expected
    return error


def test_dense_smollm2_exports_as_llama_and_runs_like_torch(smollm2, tmp_path):
    loaded, eval_data = smollm2
    result = osscar_opt.export(loaded.model, tmp_path / "dense.gguf", tokenizer=loaded.tokenizer)
    assert result.details["arch"] == "llama"
    assert_runs_like_torch(loaded.model, result.path, eval_data)


def test_per_layer_smollm2_exports_as_deci_and_runs_like_torch(smollm2, per_layer, tmp_path):
    loaded, eval_data = smollm2
    osscar_opt.save_pruned(per_layer, tmp_path / "folder", tokenizer=loaded.tokenizer)
    result = osscar_opt.export(tmp_path / "folder", tmp_path / "pruned.gguf")
    assert result.details["arch"] == "deci"
    assert len({(w["kv_heads"], w["neurons"]) for w in result.details["layers"]}) == 30
    error = assert_runs_like_torch(per_layer, result.path, eval_data)
    f16 = osscar_opt.export(tmp_path / "folder", tmp_path / "pruned-f16.gguf", outtype="f16")
    windows = eval_data.stream[: WINDOWS * SEQ_LEN].view(WINDOWS, SEQ_LEN)
    ours = engine.perplexity(f16.path, windows.numpy())
    reference = evaluate.perplexity(per_layer, eval_data.stream, SEQ_LEN, max_windows=WINDOWS)
    print(f"\nper-layer SmolLM2 in llama.cpp: f32 logits relative error {error:.2e}; perplexity f16 {ours:.3f}, "
          f"torch {reference:.3f}; {result.bytes / 2**20:.1f} MiB f32, {f16.bytes / 2**20:.1f} MiB f16")
    assert abs(ours / reference - 1) < 0.01
