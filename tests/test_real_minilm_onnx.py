"""all-MiniLM-L6-v2 pruned with heads and neurons (other head counts per layer), exported to ONNX and run
by ONNX Runtime: the same last hidden states as torch within 1e-4."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import osscar_opt  # noqa: E402
from osscar_opt.data import text  # noqa: E402
from osscar_opt.engines import onnx_runtime  # noqa: E402
from osscar_opt.models import load_model  # noqa: E402

pytestmark = pytest.mark.slow


def test_pruned_minilm_runs_in_onnx_runtime_like_torch(tmp_path):
    loaded = load_model(None, device="cpu")
    model = copy.deepcopy(loaded.model)
    calibration = text.calibration_ids(loaded.tokenizer, text.load_texts(None, "calib", False), 16, 64)
    osscar_opt.prune(model, calibration, {"heads": 0.25, "neurons": 0.25}, backend="greedy", batch_size=8,
                     progress=False)
    heads = [layer.attention.self.query.out_features // 32 for layer in model.encoder.layer]
    assert min(heads) < 12
    osscar_opt.save_pruned(model, tmp_path / "minilm", tokenizer=loaded.tokenizer)
    result = osscar_opt.export(tmp_path / "minilm", tmp_path / "minilm.onnx")
    session = onnx_runtime.session(result.path, threads=2)
    encoded = loaded.tokenizer(["A short sentence.", "A somewhat longer sentence about pruning and engines."],
                               padding=True, return_tensors="pt")
    feed = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    with torch.no_grad():
        reference = model(**feed).last_hidden_state.numpy()
    real = encoded["attention_mask"].numpy().astype(bool)  # padded positions are ignored by the pooling
    np.testing.assert_allclose(onnx_runtime.run(session, feed)[real], reference[real], atol=1e-4, rtol=0)
