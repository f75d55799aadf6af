"""Candidate models for the allocation search, assembled from the loss curves and scored on the
model's own output (docs/targets.md, "Searching the allocation").

The loss curves already found every targeted structure's support at every keep of its grid
(:mod:`osscar_opt.curves`). :class:`Supernet` keeps those supports and the layer problems they
came from (``X^T X`` and ``X^T Y`` of the dense model's inputs, in float32), so that a candidate
allocation costs forward passes only: each structure whose keep changes gets the weights re-fit on
its stored support written into its consumer, zeros in the pruned columns
(:func:`osscar_opt.formulations.surgery.mask_solution`). A masked consumer computes exactly what
the cut module would (the pruned groups' producers only feed it), so the candidate is the pruned
model, without cutting. :meth:`Supernet.restore` puts the dense weights back before the pipeline
prunes.

:class:`OutputScorer` holds the dense model's output on the search's held-out samples and scores
the model as it is now against it: the mean KL divergence of next-token (or class) distributions
for models with logits, ``1 - cosine`` of mean-pooled embeddings for encoders.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from osscar_opt.formulations.structures import Structure
from osscar_opt.formulations.surgery import mask_solution
from osscar_opt.problem import LayerProblem


class Supernet:
    """Every targeted structure's curve supports and layer problem; candidate models from them.

    ``bytes`` is the memory the stored problems take (float32 ``X^T X`` and ``X^T Y`` per
    structure: for SmolLM2-135M's 30 MLPs and 30 attention layers about 470 MB).
    """

    def __init__(self) -> None:
        self.structures: dict[str, Structure] = {}
        self.problems: dict[str, LayerProblem] = {}
        self.supports: dict[str, dict[int, tuple[int, ...]]] = {}
        self.dense: dict[str, tuple[nn.Parameter, nn.Parameter | None]] = {}
        self.current: dict[str, int] = {}
        self.bytes = 0

    def add(self, structure: Structure, problem: LayerProblem, keeps: list[int],
            supports: list[tuple[int, ...]]) -> None:
        """Keep ``structure``'s problem (float32, without its held-out moments) and its loss curve's
        ``supports`` at ``keeps``."""
        stored = problem.to(dtype=torch.float32)
        stored.heldout = None
        name = structure.name
        self.structures[name] = structure
        self.problems[name] = stored
        self.supports[name] = dict(zip(keeps, supports, strict=True))
        consumer = structure.consumer
        self.dense[name] = (consumer.weight, consumer.bias)
        self.current[name] = structure.budget_groups
        self.bytes += sum(t.numel() * t.element_size() for t in (stored.H, stored.G))

    def assemble(self, keep: Mapping[str, int]) -> None:
        """Make the model the candidate ``keep`` (structures not named stay as they are): each
        structure whose keep changed gets its re-fit weights on the stored support, masked."""
        for name, count in keep.items():
            if self.current.get(name) == count:
                continue
            structure = self.structures[name]
            if count >= structure.budget_groups:
                self._restore(name)
            else:
                support = self.supports[name].get(count)
                if support is None:
                    raise ValueError(f"keep[{name!r}]: {count} is not on the structure's grid "
                                     f"{sorted(self.supports[name])}")
                _, weights, bias = self.problems[name].evaluate(support)
                mask_solution(structure, support, weights, bias)
            self.current[name] = count

    def _restore(self, name: str) -> None:
        weight, bias = self.dense[name]
        consumer = self.structures[name].consumer
        consumer.weight = weight
        consumer.bias = bias
        self.current[name] = self.structures[name].budget_groups

    def restore(self) -> None:
        """The dense weights back in every consumer; the stored problems are released."""
        for name in self.structures:
            self._restore(name)
        self.problems.clear()


class OutputScorer:
    """The model's output distance to the dense model's on the search's held-out batches.

    ``forward(batch)`` runs the whole model on one batch. The dense outputs are recorded when the
    scorer is made (before any candidate is assembled): log-probabilities for models with logits
    (``(samples, positions, vocabulary)`` float32: 16 samples of 128 tokens of a 49k vocabulary hold
    400 MB), unit mean-pooled embeddings for encoders.
    """

    def __init__(self, forward: Callable[[torch.Tensor], Any], batches: list[torch.Tensor]) -> None:
        self.forward = forward
        self.batches = batches
        self.samples = sum(int(b.shape[0]) for b in batches)
        with torch.no_grad():
            dense = [_comparable(forward(batch)) for batch in batches]
        self.metric = dense[0][0]
        self.references = [value for _, value in dense]

    def score(self, share: float = 1.0) -> tuple[float, float]:
        """The mean distance on the first ``share`` of the batches (at least one) and the share of
        the samples it used."""
        count = max(1, min(len(self.batches), math.ceil(share * len(self.batches) - 1e-9)))
        total, weight, used = 0.0, 0, 0
        with torch.no_grad():
            for batch, reference in zip(self.batches[:count], self.references[:count], strict=True):
                metric, value = _comparable(self.forward(batch))
                distance, items = _distance(metric, reference, value)
                total, weight, used = total + distance, weight + items, used + int(batch.shape[0])
        return total / max(weight, 1), used / self.samples


def _comparable(output: Any) -> tuple[str, torch.Tensor]:
    """``("kl", log-probabilities)`` for logits, ``("1 - cosine", unit embeddings)`` for hidden states."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, torch.Tensor) and output.dim() == 2:
        logits = output  # a classifier's logits
    if logits is not None:
        return "kl", F.log_softmax(logits.float(), dim=-1).detach()
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0] if isinstance(output, tuple | list) else output
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"search: cannot score a model whose output is a {type(output).__name__}")
    pooled = hidden.float().mean(dim=1) if hidden.dim() == 3 else hidden.float().flatten(1)
    return "1 - cosine", F.normalize(pooled, dim=-1).detach()


def _distance(metric: str, reference: torch.Tensor, value: torch.Tensor) -> tuple[float, int]:
    """The summed distance and how many items (positions or samples) it sums over."""
    if metric == "kl":
        kl = (reference.exp() * (reference - value)).sum(dim=-1)
        return float(kl.double().sum()), int(kl.numel())
    cosine = (reference * value).sum(dim=-1)
    return float((1.0 - cosine).double().sum()), int(cosine.numel())
