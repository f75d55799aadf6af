"""Real conv layer problems: a stock torchvision ResNet18 (width 0.5) trained on scikit-learn's digits.

Used by ``benchmarks/certify.py``: the network is trained here (about 20 s on 2 cores), pruned once
with ``prune_vision(..., save_problems=...)`` at 50% channels, and the saved problems of its conv
layers are loaded back: one group per input channel (``kh * kw`` columns each), built from the
calibration images run through the already-pruned network (the pipeline's sequential mode).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from osscar_opt import LayerProblem
from osscar_opt.data import digits as vision_data
from osscar_opt.pipeline import prune_vision


def digits_conv_problems(samples: int = 64, epochs: int = 3, max_groups: int = 64) -> dict[str, LayerProblem]:
    """``{name: problem}`` for the conv layers of at most ``max_groups`` channel groups."""
    model, train, _test, _info = vision_data.digits_model("resnet18", epochs=epochs)
    with tempfile.TemporaryDirectory() as folder:
        prune_vision(model, train.images[:samples].contiguous(), {"channels": 0.5}, backend="local-search",
                     batch_size=32, progress=False, save_problems=folder)
        problems = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            problem = LayerProblem.load(path)
            if problem.num_groups <= max_groups and problem.group_sizes[0] > 1:
                problems[problem.meta.get("name", path.stem)] = problem
    return problems
