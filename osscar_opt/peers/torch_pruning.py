"""Torch-Pruning as a peer: its own group importance and pruning functions on LLaMA-family causal LMs.

:func:`prune_with_torch_pruning` prunes a ``LlamaForCausalLM``-shaped model in place with the PyPI
package ``torch-pruning`` (``import torch_pruning as tp``, tested with 1.6.1), to the shapes our
pipeline gives at the same budgets, so a benchmark compares *what* each method removes.

What it does
    * Importance is Torch-Pruning's own: ``tp.importance.GroupMagnitudeImportance(p=2)`` (its
      defaults: ``group_reduction="mean"``, ``normalizer="mean"``; data-free, as in its
      ``examples/LLMs/prune_llm.py``) or ``tp.importance.GroupTaylorImportance()`` (its defaults),
      which reads ``weight.grad``: gradients of the causal-LM loss (``labels = input_ids``) on
      ``calibration_ids``, accumulated over batches (sample-weighted mean loss), cleared afterwards.
    * GQA-aware: per decoder layer it removes whole KV groups (one ``k_proj`` / ``v_proj`` head with
      its ``num_heads / num_kv`` query heads: rows of ``q_proj``, ``k_proj``, ``v_proj``, input
      columns of ``o_proj``) and MLP neurons (rows of ``gate_proj`` / ``up_proj``, input columns of
      ``down_proj``). With as many KV heads as query heads a KV group is one head.
    * Uniform per-layer ratios, local ranking (Torch-Pruning's ``global_pruning=False``): every layer
      keeps ``osscar_opt.budget.keep_count(n, sparsity)`` groups (``n - round(s * n)``, at least 1),
      our rule, instead of Torch-Pruning's ``int(n * (1 - s))`` / ``round_to``, so shapes match ours.
      The lowest-scoring groups go, by ``torch.topk(..., largest=False)`` as Torch-Pruning's local
      pruning does.
    * The weights themselves are cut by Torch-Pruning: ``Group.prune()`` calls its
      ``tp.prune_linear_out_channels`` / ``tp.prune_linear_in_channels``.
    * Afterwards ``model.config`` (``num_attention_heads``, ``num_key_value_heads``,
      ``intermediate_size``, and ``head_dim`` set explicitly to the unchanged head size) and the
      module attributes that transformers' ``LlamaAttention`` / ``LlamaMLP`` read (``head_dim``,
      ``num_key_value_groups``; ``num_heads`` / ``num_key_value_heads`` where present;
      ``intermediate_size``) are updated.

What it does not do
    * No weight re-fit or bias correction of any kind (Torch-Pruning prunes and stops; it expects
      fine-tuning after), no calibration data for the magnitude importance.
    * No head-dimension or hidden-size (residual stream) pruning: ``prune_llm.py`` also shrinks the
      hidden size at ``pruning_ratio``; our pipeline never does, so neither does this peer.
    * Not Torch-Pruning's own GQA rule: its ``BasePruner`` (``prune_num_heads=True``) keeps every
      KV head and removes query heads inside each KV group (it empties the ``k_proj``/``v_proj``
      indices of GQA groups). Here the whole KV group goes, as in our pipeline; its score is the
      mean of its query heads' scores (Torch-Pruning's per-head score: the channel importance of
      the attention group averaged over the head's ``head_dim`` channels).

Where Torch-Pruning's tracing is used, and where not
    ``tp.DependencyGraph().build_dependency`` traces the whole model (one forward pass on a few
    tokens) and ``DependencyGraph.get_pruning_group(down_proj, tp.prune_linear_in_channels, ...)``
    gives the MLP groups (``down_proj`` inputs coupled to ``gate_proj`` / ``up_proj`` outputs), as
    ``BasePruner`` would. For attention, the same call does not terminate with transformers 5.x
    LLaMA: the rotary embedding's ``rotate_half`` (slice + ``cat``) maps channel indices through a
    cycle that shifts them by half a head each turn, so ``_fix_dependency_graph_non_recursive``
    never meets a group item it has seen (Torch-Pruning issue #527 reports the same endless loop
    for Qwen3; #456 and #337 for other positional encodings); the trace also couples ``k_proj``
    channels one-to-one with ``q_proj`` channels through the attention kernel, which is wrong for
    GQA. So the attention group is written by hand as a ``tp.dependency.Group`` of
    ``tp.dependency.Dependency`` edges between the graph's own nodes, rooted at the input channels of
    ``o_proj`` (the downstream root ``BasePruner`` uses for attention): ``o_proj`` inputs and
    ``q_proj`` outputs map one-to-one, and each ``k_proj`` / ``v_proj`` output channel maps to the
    same channel of every query head that reads it (what ``repeat_kv`` does). Torch-Pruning's
    importance classes score that group, and its ``Group.prune()`` cuts it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from osscar_opt._extras import require
from osscar_opt.adapters.base import check_batch_size
from osscar_opt.budget import check_sparsity, keep_count

IMPORTANCES: tuple[str, ...] = ("magnitude", "taylor")
"""Accepted ``importance`` names: Torch-Pruning's group magnitude (L2) and group Taylor importance."""

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class _Shape:
    """Per-layer sizes, the same in every decoder layer."""

    head_dim: int
    num_heads: int
    num_kv: int
    intermediate: int

    @property
    def group_heads(self) -> int:
        """Query heads per KV group."""
        return self.num_heads // self.num_kv


def prune_with_torch_pruning(
    model: nn.Module,
    calibration_ids: torch.Tensor | None,
    *,
    kv_sparsity: float,
    neuron_sparsity: float,
    importance: str = "magnitude",
    batch_size: int = 8,
) -> dict[str, Any]:
    """Prune a LLaMA-family causal LM in place with Torch-Pruning's importance; no re-fit.

    Args:
        model: a ``LlamaForCausalLM``-shaped model (``model.model.layers[i].self_attn.{q,k,v,o}_proj``
            and ``.mlp.{gate,up,down}_proj`` linear layers, the same sizes in every layer), on its
            device and in its forward dtype.
        calibration_ids: ``(samples, seq_len)`` int64 token ids, ``seq_len >= 2``; required for
            ``importance="taylor"``; for ``"magnitude"`` optional (only up to 8 tokens of its first
            row are used, to trace the model; ``0..7`` without it).
        kv_sparsity: fraction of KV groups removed per layer, in ``[0, 1)`` (plain heads when
            ``num_key_value_heads == num_attention_heads``).
        neuron_sparsity: fraction of MLP intermediate neurons removed per layer, in ``[0, 1)``.
        importance: ``"magnitude"`` (``GroupMagnitudeImportance(p=2)``) or ``"taylor"``
            (``GroupTaylorImportance()`` on causal-LM loss gradients).
        batch_size: calibration samples per forward/backward pass (Taylor).

    Returns:
        ``{"method": "torch-pruning", "importance", "kv_groups_kept", "heads_kept",
        "neurons_kept", "seconds"}``; the kept counts are per layer.

    Raises:
        ValueError: a bad argument, named in the message, before the model is touched.
        ImportError: ``torch-pruning`` is not installed.
    """
    kv_sparsity = check_sparsity(kv_sparsity, "kv_sparsity")
    neuron_sparsity = check_sparsity(neuron_sparsity, "neuron_sparsity")
    if not isinstance(importance, str) or importance not in IMPORTANCES:
        raise ValueError(f"importance: expected one of {list(IMPORTANCES)}, got {importance!r}")
    check_batch_size(batch_size)
    layers, shape = _check_model(model)
    vocab = int(model.get_input_embeddings().num_embeddings)
    if calibration_ids is None:
        if importance == "taylor":
            raise ValueError("calibration_ids: the taylor importance needs (samples, seq_len) token ids, got None")
    else:
        _check_ids(calibration_ids, vocab)
    # ImportError "... pip install 'osscar-opt[bench]' (or pip install torch-pruning)" when it is missing
    tp = require("torch_pruning", "bench", "the Torch-Pruning peer")

    start = time.perf_counter()
    kv_keep = keep_count(shape.num_kv, kv_sparsity)
    neuron_keep = keep_count(shape.intermediate, neuron_sparsity)
    device = model.get_input_embeddings().weight.device
    projections = [_linear(layer, path) for layer in layers for path in _paths()]
    grad_flags = {module: module.weight.requires_grad for module in projections}
    was_training = model.training
    model.eval()
    try:
        graph = _dependency_graph(tp, model, _example_ids(calibration_ids, vocab, device))
        if importance == "taylor":
            scorer = tp.importance.GroupTaylorImportance()
            _accumulate_gradients(model, [m.weight for m in projections], calibration_ids, batch_size, device)
        else:
            scorer = tp.importance.GroupMagnitudeImportance(p=2)
        plans = []
        for layer in layers:
            removed_kv = removed_neurons = []
            if kv_keep < shape.num_kv:
                scores = _kv_group_scores(tp, graph, scorer, layer.self_attn, shape)
                removed_kv = _lowest(scores, shape.num_kv - kv_keep)
            if neuron_keep < shape.intermediate:
                scores = _neuron_scores(tp, graph, scorer, layer.mlp, shape)
                removed_neurons = _lowest(scores, shape.intermediate - neuron_keep)
            plans.append((removed_kv, removed_neurons))
    finally:
        for module in projections:
            module.weight.grad = None
        model.train(was_training)

    for layer, (removed_kv, removed_neurons) in zip(layers, plans, strict=True):
        if removed_neurons:
            graph.get_pruning_group(layer.mlp.down_proj, tp.prune_linear_in_channels, removed_neurons).prune()
        if removed_kv:
            _hand_group(tp, graph, _attention_items(tp, layer.self_attn, shape, removed_kv, scoring=False)).prune()
        _check_pruned(layer, shape, kv_keep, neuron_keep)
    for layer in layers:  # Torch-Pruning's pruning functions make new Parameters (requires_grad=True)
        for path in _paths():
            module = _linear(layer, path)
            module.weight.requires_grad_(grad_flags.get(module, True))
    del graph
    heads_keep = kv_keep * shape.group_heads
    _update_sizes(model, layers, shape.head_dim, heads_keep, kv_keep, neuron_keep)
    return {
        "method": "torch-pruning",
        "importance": importance,
        "kv_groups_kept": kv_keep,
        "heads_kept": heads_keep,
        "neurons_kept": neuron_keep,
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------
# Validation


def _paths() -> list[tuple[str, str]]:
    return [("self_attn", name) for name in _ATTENTION] + [("mlp", name) for name in _MLP]


def _linear(layer: nn.Module, path: tuple[str, str]) -> nn.Linear:
    return getattr(getattr(layer, path[0]), path[1])


def _check_model(model: Any) -> tuple[list[nn.Module], _Shape]:
    """The decoder layers and their common sizes; ValueError naming ``model`` otherwise."""
    expected = (
        "model: expected a LLaMA-family causal LM (model.model.layers[i].self_attn.{q,k,v,o}_proj and "
        ".mlp.{gate,up,down}_proj linear layers, and a language-model head)"
    )
    if not isinstance(model, nn.Module):
        raise ValueError(f"{expected}, got {type(model).__name__}")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or getattr(model, "config", None) is None:
        raise ValueError(f"{expected}, got {type(model).__name__}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(head, nn.Module) or not isinstance(embeddings, nn.Embedding):
        raise ValueError(f"{expected}, got {type(model).__name__} without a language-model head")
    shapes = set()
    for index, layer in enumerate(layers):
        for path in _paths():
            module = getattr(getattr(layer, path[0], None), path[1], None)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"{expected}; layers[{index}].{'.'.join(path)} is {type(module).__name__}")
        shapes.add(_layer_shape(model.config, layer, index))
    if len(shapes) != 1:
        sizes = sorted(shapes, key=repr)
        raise ValueError(f"model: the decoder layers differ in size ({sizes}); expected uniform layers")
    return list(layers), shapes.pop()


def _layer_shape(config: Any, layer: nn.Module, index: int) -> _Shape:
    attention, mlp = layer.self_attn, layer.mlp
    head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
    if not head_dim:
        head_dim = config.hidden_size // config.num_attention_heads
    head_dim = int(head_dim)
    q, k, v, o = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
    if (
        head_dim <= 0
        or q.out_features % head_dim
        or k.out_features % head_dim
        or v.out_features != k.out_features
        or o.in_features != q.out_features
    ):
        raise ValueError(
            f"model: layers[{index}].self_attn projections (q {q.out_features}, k {k.out_features}, "
            f"v {v.out_features}, o {o.in_features}) do not fit head_dim={head_dim}"
        )
    num_heads, num_kv = q.out_features // head_dim, k.out_features // head_dim
    if num_kv == 0 or num_heads % num_kv:
        raise ValueError(f"model: layers[{index}] has {num_heads} query heads for {num_kv} KV heads (not a multiple)")
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if not gate.out_features == up.out_features == down.in_features:
        raise ValueError(
            f"model: layers[{index}].mlp sizes differ (gate {gate.out_features}, up {up.out_features}, "
            f"down {down.in_features})"
        )
    return _Shape(head_dim, num_heads, num_kv, down.in_features)


def _check_ids(ids: Any, vocab: int) -> None:
    tensor = isinstance(ids, torch.Tensor)
    if not tensor or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() != 2:
        raise ValueError(f"calibration_ids: expected a (samples, seq_len) integer tensor, got {_describe(ids)}")
    if ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"calibration_ids: expected at least 1 sample of at least 2 tokens, got {_describe(ids)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"calibration_ids: token ids must lie in [0, {vocab}), got [{low}, {high}]")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


# ----------------------------------------------------------------------------------------------
# Torch-Pruning: graph, gradients, importance, groups


def _example_ids(ids: torch.Tensor | None, vocab: int, device: torch.device) -> torch.Tensor:
    """``(1, n)`` token ids for tracing: the start of the first calibration sample, or ``0..n-1``."""
    if ids is not None:
        return ids[:1, :8].to(device=device, dtype=torch.long)
    return (torch.arange(8, device=device) % vocab).unsqueeze(0)


def _dependency_graph(tp: Any, model: nn.Module, example: torch.Tensor) -> Any:
    """``tp.DependencyGraph`` of the whole model, traced on ``example`` ``(1, n)`` (autograd on)."""
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        for parameter in flags:  # the trace follows grad_fn, which needs parameters that require grad
            parameter.requires_grad_(True)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unwrapped parameters" (RMSNorm weights): never pruned here
            return tp.DependencyGraph().build_dependency(
                model,
                example_inputs=example,
                forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits,
                verbose=False,
            )
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)


def _accumulate_gradients(
    model: nn.Module, weights: list[nn.Parameter], ids: torch.Tensor, batch_size: int, device: torch.device
) -> None:
    """``weight.grad`` of the mean causal-LM loss over ``ids`` ``(samples, seq_len)``, for ``weights`` only."""
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        for parameter in flags:
            parameter.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
            weight.grad = None
        samples = ids.shape[0]
        with torch.enable_grad():
            for first in range(0, samples, batch_size):
                batch = ids[first : first + batch_size].to(device=device, dtype=torch.long)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                (loss * (batch.shape[0] / samples)).backward()
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)


def _hand_group(tp: Any, graph: Any, items: list[tuple[Any, ...]]) -> Any:
    """A ``tp.dependency.Group`` from ``(trigger, handler, source, target, idxs, root_idxs)`` items.

    The first item is the root; ``root_idxs`` place every index in the root's index space, which
    is where Torch-Pruning's importance classes add up the items' scores.
    """
    group = tp.dependency.Group()
    for trigger, handler, source, target, idxs, roots in items:
        dependency = tp.dependency.Dependency(trigger, handler, graph.module2node[source], graph.module2node[target])
        group.add_dep(dependency, list(idxs))
        group[len(group) - 1].root_idxs = list(roots)
    group._DG = graph  # Group.prune() records the pruning history in its graph
    return group


def _attention_items(
    tp: Any, attention: nn.Module, shape: _Shape, kv_groups: list[int], *, scoring: bool
) -> list[tuple[Any, ...]]:
    """Group items for KV groups ``kv_groups`` of one attention, rooted at the inputs of ``o_proj``.

    Root index space: ``num_heads * head_dim`` attention-output channels. ``q_proj`` rows map
    one-to-one; a ``k_proj`` / ``v_proj`` row ``g*head_dim + d`` maps to channel ``d`` of each of
    group ``g``'s query heads: for ``scoring`` the row is listed once per query head (sorted by
    row); for pruning once (Torch-Pruning's linear pruners count ``len(idxs)``).
    """
    d, per = shape.head_dim, shape.group_heads
    copies = range(per) if scoring else range(1)
    query_rows = [h * d + i for g in kv_groups for h in range(g * per, (g + 1) * per) for i in range(d)]
    kv_rows = [g * d + i for g in kv_groups for i in range(d) for _ in copies]
    kv_roots = [(g * per + r) * d + i for g in kv_groups for i in range(d) for r in copies]
    into, out = tp.prune_linear_in_channels, tp.prune_linear_out_channels
    o = attention.o_proj
    return [
        (into, into, o, o, query_rows, query_rows),
        (into, out, o, attention.q_proj, query_rows, query_rows),
        (into, out, o, attention.k_proj, kv_rows, kv_roots),
        (into, out, o, attention.v_proj, kv_rows, kv_roots),
    ]


def _kv_group_scores(tp: Any, graph: Any, scorer: Any, attention: nn.Module, shape: _Shape) -> torch.Tensor:
    """``(num_kv,)`` scores: channel importance -> head mean (Torch-Pruning's) -> mean over the group's heads."""
    items = _attention_items(tp, attention, shape, list(range(shape.num_kv)), scoring=True)
    channels = scorer(_hand_group(tp, graph, items))  # (num_heads * head_dim,)
    heads = channels.view(shape.num_heads, shape.head_dim).mean(1)
    return heads.view(shape.num_kv, shape.group_heads).mean(1)


def _neuron_scores(tp: Any, graph: Any, scorer: Any, mlp: nn.Module, shape: _Shape) -> torch.Tensor:
    """``(intermediate,)`` scores of the traced group rooted at the inputs of ``down_proj``."""
    group = graph.get_pruning_group(mlp.down_proj, tp.prune_linear_in_channels, list(range(shape.intermediate)))
    linears = {
        (item.dep.target.module, graph.is_out_channel_pruning_fn(item.dep.handler))
        for item in group
        if isinstance(item.dep.target.module, nn.Linear)
    }
    expected = {(mlp.down_proj, False), (mlp.gate_proj, True), (mlp.up_proj, True)}
    if linears != expected:
        raise RuntimeError(
            "Torch-Pruning traced an MLP group other than down_proj inputs + gate_proj/up_proj outputs: "
            f"{sorted(graph._module2name[m] + (' out' if o else ' in') for m, o in linears)}"
        )
    return scorer(group)


def _lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` lowest scores, ascending (Torch-Pruning's local ranking)."""
    scores = torch.nan_to_num(scores.detach().float().cpu(), nan=0.0)
    return sorted(torch.topk(scores, k=count, largest=False).indices.tolist())


# ----------------------------------------------------------------------------------------------
# After pruning


def _check_pruned(layer: nn.Module, shape: _Shape, kv_keep: int, neuron_keep: int) -> None:
    attention, mlp = layer.self_attn, layer.mlp
    width, kv_width = kv_keep * shape.group_heads * shape.head_dim, kv_keep * shape.head_dim
    got = (
        attention.q_proj.out_features,
        attention.o_proj.in_features,
        attention.k_proj.out_features,
        attention.v_proj.out_features,
        mlp.gate_proj.out_features,
        mlp.up_proj.out_features,
        mlp.down_proj.in_features,
    )
    if got != (width, width, kv_width, kv_width, neuron_keep, neuron_keep, neuron_keep):
        raise RuntimeError(f"Torch-Pruning left unexpected shapes (q, o, k, v, gate, up, down) = {got}")


def _update_sizes(
    model: nn.Module, layers: list[nn.Module], head_dim: int, heads: int, kv_heads: int, neurons: int
) -> None:
    """Write the new per-layer sizes into every config object and the modules' cached sizes."""
    configs = {id(model.config): model.config}
    for layer in layers:
        for module in (layer.self_attn, layer.mlp):
            config = getattr(module, "config", None)
            if config is not None:
                configs.setdefault(id(config), config)
        attention = layer.self_attn
        attention.head_dim = head_dim
        attention.num_key_value_groups = heads // kv_heads
        for name, value in (("num_heads", heads), ("num_key_value_heads", kv_heads)):
            if hasattr(attention, name):
                setattr(attention, name, value)
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = neurons
    for config in configs.values():
        config.num_attention_heads = heads
        config.num_key_value_heads = kv_heads
        config.intermediate_size = neurons
        config.head_dim = head_dim
