"""Query heads pruned inside KV groups (``q_heads``) export to GGUF and run in llama.cpp as in torch:
per-block counts as ``deci`` arrays, equal counts in every block as plain ``llama``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

import osscar_opt  # noqa: E402
from osscar_opt.budget import PerLayerKeep  # noqa: E402
from osscar_opt.engines import llama_cpp as engine  # noqa: E402
from tests.tiny_llms import calibration, held_out_ids, tiny_llm, tokenizer, widths  # noqa: E402


@pytest.mark.parametrize(("budgets", "arch", "expected"), [
    (PerLayerKeep({"model.layers.0.self_attn.o_proj:q_heads": 1}), "deci", [(2, 2, 96), (4, 2, 96), (4, 2, 96)]),
    ({"q_heads": 0.5}, "llama", [(2, 2, 96)] * 3),
], ids=["per-block", "uniform"])
def test_pruned_query_heads_run_in_llama_cpp_as_in_torch(budgets, arch, expected, tmp_path):
    model = copy.deepcopy(tiny_llm("llama"))  # tiny_llm is cached: prune a copy
    osscar_opt.prune(model, calibration(), budgets, backend="greedy", damp=0.01, batch_size=4, progress=False)
    assert widths(model) == expected
    result = osscar_opt.export(model, tmp_path / "model.gguf", outtype="f32", tokenizer=tokenizer())
    assert result.details["arch"] == arch
    ids = held_out_ids(64)
    llm = engine.open_model(result.path, n_ctx=128, threads=2, all_logits=True)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    assert float(np.abs(engine.logits(llm, ids) - reference).max() / np.abs(reference).max()) < 1e-3
