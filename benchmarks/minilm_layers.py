"""Real layer problems of all-MiniLM-L6-v2 built from dense activations on stdlib docstrings.

Used by ``benchmarks/certify.py``: for every encoder block, the attention output projection
(``attention.output.dense``, 12 groups of 32 columns, one per head) and the FFN output projection
(``output.dense``, 1536 single-column groups, one per neuron), with ``Y = X W^T`` from the dense
model (no sequential pruning).
"""

from __future__ import annotations

import torch

from osscar_opt import LayerProblem, StatsAccumulator


def minilm_layer_problems(samples: int = 32, seq_len: int = 64, damp: float = 1e-2,
                          blocks: list[int] | None = None) -> dict[str, LayerProblem]:
    """``{"block{i}.heads": problem, "block{i}.ffn": problem}`` for the chosen encoder blocks."""
    from osscar_opt import data
    from osscar_opt.models import load_model

    loaded = load_model(None, device="cpu")
    model = loaded.model
    ids = data.calibration_ids(loaded.tokenizer, data.load_texts(None, "calib", False), samples, seq_len)
    layers = model.encoder.layer
    chosen = list(range(len(layers))) if blocks is None else blocks
    accumulators: dict[str, tuple[StatsAccumulator, torch.nn.Linear, list]] = {}
    hooks = []
    for index in chosen:
        attention = layers[index].attention.output.dense
        ffn = layers[index].output.dense
        heads = model.config.num_attention_heads
        head_dim = attention.in_features // heads
        head_groups = [list(range(h * head_dim, (h + 1) * head_dim)) for h in range(heads)]
        neuron_groups = torch.arange(ffn.in_features)
        for name, module, groups in ((f"block{index}.heads", attention, head_groups),
                                     (f"block{index}.ffn", ffn, neuron_groups)):
            accumulator = StatsAccumulator(module.in_features)
            accumulators[name] = (accumulator, module, groups)

            def hook(_module, inputs, _output, accumulator=accumulator):
                accumulator.add(inputs[0].detach())

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], 8):
                batch = ids[start:start + 8]
                model(input_ids=batch, attention_mask=torch.ones_like(batch))
    finally:
        for handle in hooks:
            handle.remove()
    return {
        name: accumulator.problem(module.weight.detach(), groups, damp=damp, bias=module.bias.detach(),
                                  meta={"name": name, "kind": "heads" if name.endswith("heads") else "neurons"})
        for name, (accumulator, module, groups) in accumulators.items()
    }
