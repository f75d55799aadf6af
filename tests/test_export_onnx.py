"""ONNX export run by ONNX Runtime: pruned BERT encoders (heads and neurons, other widths per layer) and
torchvision ResNet / MobileNetV2 with per-layer channels give torch's outputs within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import osscar_opt  # noqa: E402
from osscar_opt.budget import PerLayerKeep  # noqa: E402
from osscar_opt.engines import onnx_runtime  # noqa: E402
from tests.tiny_models import small_vision_model  # noqa: E402
from tests.tiny_transformers import tiny_model, token_ids  # noqa: E402


def pruned_bert() -> torch.nn.Module:
    model = tiny_model("bert")
    keep = {"encoder.layer.0.attention.output.dense": 3, "encoder.layer.0.output.dense": 20,
            "encoder.layer.1.attention.output.dense": 2, "encoder.layer.1.output.dense": 36}
    osscar_opt.prune(model, token_ids(8), PerLayerKeep(keep), backend="greedy", damp=0.01, batch_size=4,
                     progress=False)
    return model


def test_pruned_bert_heads_and_neurons_run_in_onnx_runtime_like_torch(tmp_path):
    model = pruned_bert()
    assert model.encoder.layer[0].attention.self.query.out_features == 24  # 3 heads of 8
    result = osscar_opt.export(model, tmp_path / "bert.onnx", "onnx")
    session = onnx_runtime.session(result.path, threads=2)
    for batch, length in ((3, 10), (1, 17)):  # dynamic batch and sequence axes
        ids = token_ids(batch, length, seed=batch)
        mask = torch.ones_like(ids)
        mask[0, length - 3:] = 0  # padding
        with torch.no_grad():
            reference = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        ours = onnx_runtime.run(session, {"input_ids": ids, "attention_mask": mask})
        np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("architecture", ["resnet50", "mobilenet_v2"])
def test_pruned_vision_networks_run_in_onnx_runtime_like_torch(architecture, tmp_path):
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = small_vision_model(architecture)
    head = [module for module in model.modules() if isinstance(module, torch.nn.Linear)][-1]
    with torch.no_grad():  # random BatchNorm statistics give logits near 50; scale them to about 5, where
        head.weight.mul_(0.1)  # 1e-4 is not below float32's rounding of the largest logit
        head.bias.mul_(0.1)
    pruned, report = osscar_opt.prune_vision(model, images, {"channels": 0.4}, progress=False)
    assert len({record.keep for record in report.layers}) > 1  # other channel counts per layer
    result = osscar_opt.export(pruned, tmp_path / "net.onnx")
    assert result.format == "onnx" and result.details["inputs"] == ["images"]
    session = onnx_runtime.session(result.path, threads=2)
    test = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = pruned(test).numpy()
    np.testing.assert_allclose(onnx_runtime.run(session, {"images": test}), reference, atol=1e-4, rtol=0)


def test_onnx_refuses_causal_lms_and_bad_samples_naming_what_it_takes(tmp_path):
    with pytest.raises(ValueError, match="ONNX export supports BERT-family encoders .* got a LlamaForCausalLM"):
        osscar_opt.export(tiny_model("llama"), tmp_path / "l.onnx", "onnx")
    with pytest.raises(ValueError, match="a ONNX file name ends in .onnx"):
        osscar_opt.export(tiny_model("bert"), tmp_path / "b.gguf", "onnx")
    with pytest.raises(ValueError, match=r"sample: expected a \(batch, 3, height, width\) image tensor"):
        osscar_opt.export(small_vision_model("resnet50"), tmp_path / "r.onnx", "onnx",
                          sample=torch.zeros(3, 32, 32))
    assert list(tmp_path.iterdir()) == []
