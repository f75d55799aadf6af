"""Real layer problems of all-MiniLM-L6-v2 (or SmolLM2-135M) built from dense activations on stdlib docstrings.

Used by ``benchmarks/certify.py``: for every chosen block, the attention output projection
(MiniLM ``attention.output.dense``: 12 groups of 32 columns, one per head; SmolLM2 ``o_proj``: 3
key-value groups) and the MLP output projection (MiniLM ``output.dense``: 1536 single-column
groups, one per neuron; SmolLM2 ``down_proj``: 1536), with ``Y = X W^T`` from the dense model (no
sequential pruning). Names: ``block{i}.heads`` / ``block{i}.ffn`` (the attention structure's kind
for other models).
"""

from __future__ import annotations

import torch

from osscar_opt import LayerProblem, StatsAccumulator
from osscar_opt.formulations.structures import Structure


def minilm_layer_problems(samples: int = 32, seq_len: int = 64, damp: float = 1e-2,
                          blocks: list[int] | None = None, model: str | None = None) -> dict[str, LayerProblem]:
    """``{"block{i}.heads": problem, "block{i}.ffn": problem}`` for the chosen blocks of ``model``
    (None: all-MiniLM-L6-v2; ``"smollm2"``)."""
    from osscar_opt.adapters.registry import adapter_for
    from osscar_opt.data import text
    from osscar_opt.models import load_model

    loaded = load_model(model, device="cpu")
    model = loaded.model
    ids = text.calibration_ids(loaded.tokenizer, text.load_texts(None, "calib", False), samples, seq_len)
    stages = adapter_for(model).stages()
    chosen = list(range(len(stages))) if blocks is None else blocks
    accumulators: dict[str, tuple[StatsAccumulator, Structure]] = {}
    hooks = []
    for index in chosen:
        for structure in stages[index].structures(stages[index].module):
            name = f"block{index}.{'ffn' if structure.kind == 'neurons' else structure.kind}"
            accumulator = StatsAccumulator(structure.in_features)
            accumulators[name] = (accumulator, structure)

            def hook(_module, inputs, _output, accumulator=accumulator, structure=structure):
                accumulator.add(structure.input_rows(inputs[0].detach()))

            hooks.append(structure.consumer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], 8):
                batch = ids[start:start + 8]
                model(input_ids=batch, attention_mask=torch.ones_like(batch))
    finally:
        for handle in hooks:
            handle.remove()
    return {
        name: accumulator.problem(structure.weight(), structure.groups, damp=damp,
                                  bias=None if structure.consumer.bias is None else structure.consumer.bias.detach(),
                                  meta={"name": name, "kind": structure.kind})
        for name, (accumulator, structure) in accumulators.items()
    }
