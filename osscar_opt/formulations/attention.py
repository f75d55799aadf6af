"""Attention formulations: heads (multi-head attention) and key-value groups (GQA).

Heads: group ``h`` owns the ``head_dim`` input columns ``h*d .. (h+1)*d-1`` of the output
projection and the same rows of the query, key and value projections.

KV groups (LLaMA-family GQA with ``num_heads = r * num_kv_heads``): group ``j`` is KV head ``j``
with its ``r`` query heads ``j*r .. (j+1)*r-1`` (the order ``repeat_kv`` uses): the output
projection columns and query rows of those heads, and the key/value rows of KV head ``j``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from osscar_opt.formulations.structures import Producer, Structure, check_linear, contiguous_groups


def head_structure(
    name: str,
    query: nn.Module,
    key: nn.Module,
    value: nn.Module,
    output: nn.Module,
    head_dim: int,
    on_resize: Callable[[int], None] | None = None,
) -> Structure:
    """Attention heads as groups of the output projection (``num_heads * head_dim`` inputs)."""
    output = check_linear(output, f"{name} (attention output)")
    width = output.in_features
    if head_dim <= 0 or width % head_dim:
        raise ValueError(f"model: {name} has {width} inputs, not a multiple of head_dim={head_dim}")
    num_heads = width // head_dim
    groups = contiguous_groups(num_heads, head_dim)
    producers = [Producer(check_linear(m, f"{name} producer"), groups) for m in (query, key, value)]
    return Structure(name, "heads", output, groups, producers, on_resize)


def kv_group_structure(
    name: str,
    query: nn.Module,
    key: nn.Module,
    value: nn.Module,
    output: nn.Module,
    head_dim: int,
    on_resize: Callable[[int], None] | None = None,
) -> Structure:
    """GQA key-value groups: one KV head with all the query heads that read it."""
    output = check_linear(output, f"{name} (attention output)")
    key = check_linear(key, f"{name} key projection")
    if head_dim <= 0 or output.in_features % head_dim or key.out_features % head_dim:
        raise ValueError(f"model: {name} projections are not multiples of head_dim={head_dim}")
    num_heads = output.in_features // head_dim
    num_kv = key.out_features // head_dim
    if num_heads % num_kv:
        raise ValueError(f"model: {name} has {num_heads} query heads for {num_kv} KV heads (not a multiple)")
    width = (num_heads // num_kv) * head_dim
    query_groups = contiguous_groups(num_kv, width)
    kv_rows = contiguous_groups(num_kv, head_dim)
    producers = [
        Producer(check_linear(query, f"{name} query projection"), query_groups),
        Producer(key, kv_rows),
        Producer(check_linear(value, f"{name} value projection"), kv_rows),
    ]
    return Structure(name, "kv-groups", output, query_groups, producers, on_resize)
