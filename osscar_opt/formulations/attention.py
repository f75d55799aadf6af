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

from osscar_opt.formulations.layers import check_linear, matrix_shape
from osscar_opt.formulations.structures import Producer, Structure, contiguous_groups


def fused_head_structure(
    name: str,
    query_key_value: nn.Module,
    output: nn.Module,
    head_dim: int,
    on_resize: Callable[[int], None] | None = None,
) -> Structure:
    """Heads with one fused ``q | k | v`` projection (GPT-2's ``c_attn``, ``3 * width`` outputs)."""
    output = check_linear(output, f"{name} (attention output)")
    fused = check_linear(query_key_value, f"{name} fused query/key/value projection")
    groups = _head_groups(name, output, head_dim)
    width = matrix_shape(output)[1]
    if matrix_shape(fused)[0] != 3 * width:
        raise ValueError(f"model: {name} fused projection has {matrix_shape(fused)[0]} outputs, expected 3 x {width}")
    rows = [[segment * width + i for segment in range(3) for i in columns] for columns in groups]
    return Structure(name, "heads", output, groups, [Producer(fused, rows, segments=3)], on_resize)


def _head_groups(name: str, output: nn.Module, head_dim: int) -> list[list[int]]:
    """``head_dim``-wide column groups of the output projection."""
    width = matrix_shape(output)[1]
    if head_dim <= 0 or width % head_dim:
        raise ValueError(f"model: {name} has {width} inputs, not a multiple of head_dim={head_dim}")
    return contiguous_groups(width // head_dim, head_dim)


def kv_group_structure(
    name: str,
    query: nn.Module,
    key: nn.Module,
    value: nn.Module,
    output: nn.Module,
    head_dim: int,
    on_resize: Callable[[int], None] | None = None,
) -> Structure:
    """GQA key-value groups: one KV head with all the query heads that read it.

    With as many KV heads as query heads this is plain multi-head attention (kind ``"heads"``).
    """
    output = check_linear(output, f"{name} (attention output)")
    key = check_linear(key, f"{name} key projection")
    width, kv_width = matrix_shape(output)[1], matrix_shape(key)[0]
    if head_dim <= 0 or width % head_dim or kv_width % head_dim:
        raise ValueError(f"model: {name} projections are not multiples of head_dim={head_dim}")
    num_heads = width // head_dim
    num_kv = kv_width // head_dim
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
    kind = "heads" if num_kv == num_heads else "kv_groups"
    return Structure(name, kind, output, query_groups, producers, on_resize)


# Multi-head attention is GQA with one query head per KV head (its structures have kind "heads").
head_structure = kv_group_structure


def query_head_structure(
    name: str,
    query: nn.Module,
    output: nn.Module,
    head_dim: int,
    kv_heads: int,
    on_resize: Callable[[int], None] | None = None,
    query_rows: list[list[int]] | None = None,
) -> Structure:
    """Query heads inside the KV groups of a GQA attention (kind ``"q_heads"``).

    Group ``h`` is query head ``h``: ``head_dim`` input columns of the output projection and the
    same rows of the query projection (or ``query_rows[h]`` of a fused projection); keys and values
    stay. The ``r = heads / kv_heads`` query heads of KV group ``j`` (heads ``j*r .. (j+1)*r-1``,
    the order ``repeat_kv`` uses) form block ``j``: every block keeps the same number of heads,
    since the stock forward repeats each key-value head for the same number of query heads.
    ``name`` is the output projection's name with ``":q_heads"`` (the KV-group structure of the
    same projection has the plain name), so budgets, reports and allocations tell the two apart.
    """
    output = check_linear(output, f"{name} (attention output)")
    groups = _head_groups(name, output, head_dim)
    if kv_heads < 1 or len(groups) % kv_heads:
        raise ValueError(f"model: {name} has {len(groups)} query heads for {kv_heads} KV heads (not a multiple)")
    rows = groups if query_rows is None else query_rows
    producer = Producer(check_linear(query, f"{name} query projection"), rows)
    return Structure(name, "q_heads", output, groups, [producer], on_resize, blocks=kv_heads)


def fused_kv_group_structure(
    name: str,
    query_key_value: nn.Module,
    output: nn.Module,
    head_dim: int,
    kv_heads: int,
    on_resize: Callable[[int], None] | None = None,
) -> Structure:
    """KV groups (or heads) with one fused ``q | k | v`` projection of unequal segments (Phi-3's
    ``qkv_proj``: ``heads * d`` query rows, then ``kv_heads * d`` key rows, then as many value rows).

    Group ``j`` owns the query rows of its ``r`` query heads and the key and value rows of KV
    head ``j``; the kept rows stay laid out query | key | value, so the module stays fused.
    """
    output = check_linear(output, f"{name} (attention output)")
    fused = check_linear(query_key_value, f"{name} fused query/key/value projection")
    width = matrix_shape(output)[1]
    if head_dim <= 0 or width % head_dim or kv_heads < 1 or (width // head_dim) % kv_heads:
        raise ValueError(f"model: {name} has {width} inputs: not {kv_heads} KV groups of heads of {head_dim}")
    if matrix_shape(fused)[0] != width + 2 * kv_heads * head_dim:
        raise ValueError(f"model: {name} fused projection has {matrix_shape(fused)[0]} outputs, expected "
                         f"{width} + 2 x {kv_heads * head_dim}")
    query = contiguous_groups(kv_heads, width // kv_heads)
    key = contiguous_groups(kv_heads, head_dim, offset=width)
    value = contiguous_groups(kv_heads, head_dim, offset=width + kv_heads * head_dim)
    rows = [q + k + v for q, k, v in zip(query, key, value, strict=True)]
    kind = "heads" if width // head_dim == kv_heads else "kv_groups"
    producer = Producer(fused, rows, layout=[query, key, value])
    return Structure(name, kind, output, query, [producer], on_resize)


def interleaved_head_structure(
    name: str,
    query_key_value: nn.Module,
    output: nn.Module,
    head_dim: int,
    on_resize: Callable[[int], None] | None = None,
) -> Structure:
    """Heads with a fused projection interleaved per head (GPT-NeoX's ``query_key_value``: head ``h``
    owns the ``3 * d`` consecutive rows ``q_h | k_h | v_h``, reshaped with ``-1`` heads)."""
    output = check_linear(output, f"{name} (attention output)")
    fused = check_linear(query_key_value, f"{name} fused query/key/value projection")
    groups = _head_groups(name, output, head_dim)
    if matrix_shape(fused)[0] != 3 * matrix_shape(output)[1]:
        raise ValueError(f"model: {name} fused projection has {matrix_shape(fused)[0]} outputs, expected "
                         f"3 x {matrix_shape(output)[1]}")
    rows = contiguous_groups(len(groups), 3 * head_dim)
    return Structure(name, "heads", output, groups, [Producer(fused, rows)], on_resize)
